//! `--matrix`: the standard configurations, each against a freshly spawned reflector, in one
//! Markdown table (the rows and how to read them are in the tool's documentation, `main.rs`).

use crate::args::Args;
use crate::load;
use crate::report::Report;

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Latency and cost under a sustainable load.
    Load,
    /// Sessions without events: CPU and memory per session.
    Idle,
    /// More than the reflector can take: what still gets through, and its peak memory.
    Overload,
}

/// One configuration of the matrix.
#[derive(Clone, Copy, Debug)]
struct Row {
    /// What `--matrix-rows` calls it.
    id: &'static str,
    sessions: u32,
    clients: u32,
    rate: f64,
    payload_bytes: u32,
    kind: Kind,
}

const fn load(id: &'static str, sessions: u32, clients: u32, rate: f64) -> Row {
    Row { id, sessions, clients, rate, payload_bytes: 64, kind: Kind::Load }
}

/// The standard rows, in the order they run.
const ROWS: &[Row] = &[
    load("1x2x20", 1, 2, 20.0),
    load("1x32x20", 1, 32, 20.0),
    load("1x32x50", 1, 32, 50.0),
    load("1x32x100", 1, 32, 100.0),
    load("1x32x200", 1, 32, 200.0),
    load("1x32x300", 1, 32, 300.0),
    load("1x32x500", 1, 32, 500.0),
    load("10x8x50", 10, 8, 50.0),
    load("100x4x20", 100, 4, 20.0),
    Row { id: "idle", sessions: 1000, clients: 2, rate: 0.0, payload_bytes: 64, kind: Kind::Idle },
    Row { id: "overload", sessions: 1, clients: 32, rate: 1000.0, payload_bytes: 240, kind: Kind::Overload },
];

/// The rows `filter` names (all when empty).
fn select(filter: &[String]) -> Result<Vec<Row>, String> {
    if filter.is_empty() {
        return Ok(ROWS.to_vec());
    }
    let mut rows = Vec::new();
    for id in filter {
        let id = id.trim();
        let row = ROWS.iter().find(|r| r.id == id).ok_or_else(|| {
            let ids: Vec<&str> = ROWS.iter().map(|r| r.id).collect();
            format!("no matrix row {id:?}; the rows are {}", ids.join(", "))
        })?;
        if !rows.iter().any(|r: &Row| r.id == row.id) {
            rows.push(*row);
        }
    }
    Ok(rows)
}

/// The config column: `1 × 32 × 200/s`, `1,000 idle × 2`, `overload 1 × 32 × 1000/s, 240 B`.
fn config(row: &Row, rate: f64) -> String {
    let sessions = thousands(row.sessions as u64);
    match row.kind {
        Kind::Load => format!("{sessions} × {} × {rate}/s", row.clients),
        Kind::Idle => format!("{sessions} idle × {}", row.clients),
        Kind::Overload => format!("overload {sessions} × {} × {rate}/s, {} B", row.clients, row.payload_bytes),
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs the matrix; `Ok(false)` when some row was not clean or could not run.
pub(crate) fn run(args: &Args, open_files: Option<u64>) -> Result<bool, String> {
    if args.matrix_rows.iter().any(|r| r == "list") {
        for row in ROWS {
            println!("{:<10} {}", row.id, config(row, row.rate));
        }
        return Ok(true);
    }
    let rows = select(&args.matrix_rows)?;
    if !(args.matrix_seconds > 0.0 && args.matrix_rate_scale > 0.0 && args.matrix_rate_scale.is_finite()) {
        return Err("--matrix-seconds and --matrix-rate-scale must be positive".into());
    }
    let mut header = "| config | delivered/s | p50 ms | p99 ms | max ms | reflector CPU % | µs CPU/delivery | reflector RSS MB | clean? |".to_string();
    let mut rule = "|---|---:|---:|---:|---:|---:|---:|---|---|".to_string();
    if args.callgrind {
        header.push_str(" instructions |");
        rule.push_str("---:|");
    }
    let mut table = vec![header, rule];
    let mut all_clean = true;
    for (i, row) in rows.iter().enumerate() {
        let rate = row.rate * args.matrix_rate_scale;
        let label = config(row, rate);
        eprintln!("synq-load --matrix: row {}/{} ({}): {label}", i + 1, rows.len(), row.id);
        let mut row_args = args.clone();
        row_args.spawn = true;
        row_args.quiet = true;
        row_args.sessions = row.sessions;
        row_args.clients = row.clients;
        row_args.rate = rate;
        row_args.payload_bytes = row.payload_bytes;
        row_args.seconds = args.matrix_seconds;
        let cells = match load::run(&row_args, open_files, row.id) {
            Ok(report) => {
                eprintln!("{}", report.summary_line());
                all_clean &= report.clean();
                cells(row, &report, args.callgrind)
            }
            Err(e) => {
                eprintln!("synq-load --matrix: row {} not run: {e}", row.id);
                all_clean = false;
                let mut cells = vec!["—".to_string(); 7];
                cells.push(format!("not run: {e}"));
                if args.callgrind {
                    cells.push("—".into());
                }
                cells
            }
        };
        table.push(format!("| {label} | {} |", cells.join(" | ")));
        // Let the stopped reflector's sockets and the machine settle before the next row.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    println!("{}", table.join("\n"));
    Ok(all_clean)
}

/// The cells after the config column.
fn cells(row: &Row, report: &Report, callgrind: bool) -> Vec<String> {
    let na = || "n/a".to_string();
    let idle = row.kind == Kind::Idle;
    let dash = || "—".to_string();
    let latency =
        |f: fn(&crate::report::Latency) -> f64| report.latency.as_ref().map_or_else(na, |l| format!("{:.2}", f(l)));
    let mb = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let rss_end = report.memory_end.map_or_else(na, |m| mb(m.rss_kib));
    let rss = match row.kind {
        Kind::Load => rss_end,
        Kind::Idle => {
            format!("{rss_end}; {} KiB/session", report.rss_per_session_kib().map_or_else(na, |k| format!("{k:.1}")))
        }
        Kind::Overload => format!("{rss_end}; peak {}", report.memory_peak.map_or_else(na, mb)),
    };
    let mut cells = vec![
        if idle { dash() } else { format!("{:.0}", report.delivered_per_second()) },
        if idle { dash() } else { latency(|l| l.p50) },
        if idle { dash() } else { latency(|l| l.p99) },
        if idle { dash() } else { latency(|l| l.max) },
        report.reflector_cpu_percent().map_or_else(na, |c| format!("{c:.0}")),
        if idle { dash() } else { report.us_per_delivery().map_or_else(na, |v| format!("{v:.2}")) },
        rss,
        if report.clean() { "yes".into() } else { format!("no: {}", report.problems()) },
    ];
    if callgrind {
        cells.push(match (&report.instructions, idle) {
            (Some(Err(e)), _) => format!("n/a ({e})"),
            (_, true) => report.instructions_per_session_second().map_or_else(na, |v| format!("{v:.0} / session-s")),
            (_, false) => report.instructions_per_delivery().map_or_else(na, |v| format!("{v:.0} / delivery")),
        });
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_selected_by_exact_id_in_the_given_order() {
        let ids = |filter: &[&str]| -> Result<Vec<&str>, String> {
            let filter: Vec<String> = filter.iter().map(|s| s.to_string()).collect();
            Ok(select(&filter)?.iter().map(|r| r.id).collect())
        };
        assert_eq!(ids(&[]).unwrap().len(), ROWS.len());
        // `1x32x20` is not a prefix match for `1x32x200`.
        assert_eq!(ids(&["idle", "1x32x20", "idle"]), Ok(vec!["idle", "1x32x20"]));
        let error = ids(&["1x32"]).unwrap_err();
        assert!(error.contains("no matrix row \"1x32\"") && error.contains("overload"), "{error}");
    }

    #[test]
    fn config_labels() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        let idle = ROWS.iter().find(|r| r.id == "idle").unwrap();
        assert_eq!(config(idle, 0.0), "1,000 idle × 2");
        assert_eq!(config(&ROWS[4], 10.0), "1 × 32 × 10/s");
    }
}
