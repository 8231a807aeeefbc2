//! Instruction counts of a reflector run under valgrind's callgrind (`--callgrind`).
//!
//! The reflector is started as `valgrind --tool=callgrind --callgrind-out-file=OUT synq-reflector …`.
//! At the start of the measured window the tool zeroes callgrind's counters (`vgdb --pid=PID
//! zero`), at its end it asks for a dump (`vgdb --pid=PID dump window`), which callgrind writes to
//! `OUT.1`; the instructions executed in the window are that file's `Ir` total. (`OUT` itself gets
//! the rest of the run when the reflector exits.)

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of one callgrind run.
pub(crate) struct Callgrind {
    /// `--callgrind-out-file`.
    out: PathBuf,
}

impl Callgrind {
    /// A run writing to a new file in `dir` named after `label`.
    pub(crate) fn new(dir: &Path, label: &str) -> Self {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        let out = dir.join(format!("synq-load-callgrind.{label}.{}.{stamp}.out", std::process::id()));
        Self { out }
    }

    /// The command that runs `exe` under callgrind.
    pub(crate) fn command(&self, exe: &Path) -> Command {
        let mut command = Command::new("valgrind");
        command
            .arg("--tool=callgrind")
            .arg("--quiet")
            .arg(format!("--callgrind-out-file={}", self.out.display()))
            .arg(exe);
        command
    }

    /// Zeroes the counters of the callgrind run `pid` (start of the window).
    pub(crate) fn zero(&self, pid: u32) -> Result<(), String> {
        vgdb(pid, &["zero"])
    }

    /// Dumps the counters of `pid` (end of the window) and returns the instructions counted since
    /// [`Callgrind::zero`].
    pub(crate) fn dump(&self, pid: u32) -> Result<u64, String> {
        vgdb(pid, &["dump", "window"])?;
        let file = self.window_file();
        // callgrind writes the dump while vgdb returns; give it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::fs::read_to_string(&file).map_err(|e| e.to_string()).and_then(|t| total_ir(&t)) {
                Ok(ir) => return Ok(ir),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(format!("cannot read {}: {e}", file.display()));
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    /// The file of the window's dump (the first dump of the run).
    pub(crate) fn window_file(&self) -> PathBuf {
        let mut name = self.out.clone().into_os_string();
        name.push(".1");
        name.into()
    }
}

/// Sends a callgrind monitor command to `pid` through vgdb.
fn vgdb(pid: u32, command: &[&str]) -> Result<(), String> {
    let output = Command::new("vgdb")
        .arg(format!("--pid={pid}"))
        .args(command)
        .output()
        .map_err(|e| format!("cannot run vgdb: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "vgdb {} failed ({}): {}",
            command.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The total of the `Ir` event in a callgrind output file: the `totals:` line (or, without one,
/// `summary:`), at the position of `Ir` in the `events:` line.
pub(crate) fn total_ir(text: &str) -> Result<u64, String> {
    if !text.starts_with("# callgrind format") && !text.lines().any(|l| l.starts_with("creator: callgrind")) {
        return Err("not a callgrind output file".into());
    }
    let events = text.lines().find_map(|l| l.strip_prefix("events:")).ok_or("no `events:` line")?;
    let index = events.split_whitespace().position(|e| e == "Ir").ok_or("the events do not include Ir")?;
    let totals = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("totals:"))
        .or_else(|| text.lines().find_map(|l| l.strip_prefix("summary:")))
        .ok_or("no `totals:` or `summary:` line")?;
    let value = totals.split_whitespace().nth(index).ok_or("the totals have no Ir value")?;
    value.parse().map_err(|_| format!("the Ir total {value:?} is not a count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head and tail of a real callgrind 3.19 dump of `synq-reflector`.
    const DUMP: &str = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 2149\n\
        cmd:  /tmp/synq-reflector --listen 127.0.0.1:0\npart: 1\n\n\ndesc: I1 cache: \n\
        desc: Trigger: dump window\n\npositions: line\nevents: Ir\nsummary: 2582837\n\n\n\
        ob=(1) /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\nfl=(1) ???\nfn=(0) 0x1ab70\n\
        calls=0 0 \n0 2582837\n\ntotals: 2582837\n";

    #[test]
    fn a_dump_gives_its_ir_total() {
        assert_eq!(total_ir(DUMP), Ok(2_582_837));
    }

    #[test]
    fn ir_is_read_at_its_position_among_several_events() {
        let text = "# callgrind format\nevents: Dr Ir Dw\nsummary: 1 2 3\ntotals: 10 20 30\n";
        assert_eq!(total_ir(text), Ok(20));
        // Without `totals:`, `summary:` serves.
        assert_eq!(total_ir("# callgrind format\nevents: Dr Ir\nsummary: 7 8\n"), Ok(8));
    }

    #[test]
    fn files_without_an_ir_total_are_errors() {
        assert!(total_ir("").is_err());
        assert!(total_ir("events: Ir\ntotals: 5\n").is_err(), "no callgrind header");
        assert!(total_ir("# callgrind format\nevents: Dr Dw\ntotals: 1 2\n").is_err(), "no Ir event");
        assert!(total_ir("# callgrind format\nevents: Ir\n").is_err(), "no totals");
        assert!(total_ir("# callgrind format\nevents: Dr Ir\ntotals: 1\n").is_err(), "short totals");
        assert!(total_ir("# callgrind format\nevents: Ir\ntotals: lots\n").is_err(), "not a number");
    }

    #[test]
    fn the_window_is_the_first_dump() {
        let run = Callgrind { out: PathBuf::from("/tmp/x.out") };
        assert_eq!(run.window_file(), PathBuf::from("/tmp/x.out.1"));
    }
}
