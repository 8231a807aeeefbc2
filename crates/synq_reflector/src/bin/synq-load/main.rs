//! `synq-load`: a load generator for the `synq-reflector` UDP reflector.
//!
//! It runs `S` sessions × `N` simulated clients, each a raw renet client (netcode, unsecure)
//! that joins its session and sends `E` events a second whose payload is `--payload-bytes` of
//! random "sealed" bytes (the reflector never opens them). The first 16 bytes of each payload carry
//! the sender, an event number and the send time (nanoseconds since an epoch shared by the whole
//! tool), so every receiver can tell how long the event took to reach it. An event's latency is
//! the time from its send until the *last* client of its session (the sender included) has it.
//!
//! ```text
//! # against a reflector started by the tool itself (the synq-reflector next to this binary)
//! synq-load --spawn --sessions 1 --clients 32 --rate 200 --seconds 10
//! # against a running reflector (give its pid to get its CPU use)
//! synq-load --reflector 127.0.0.1:5800 --reflector-pid 1234 --sessions 100 --clients 4
//! # idle sessions (no events): reflector CPU and resident memory per session
//! synq-load --spawn -s 500 -n 2 -e 0
//! # the standard matrix, one Markdown table (see below)
//! synq-load --matrix
//! ```
//!
//! Sources: `args.rs` (options), `client.rs` (the simulated clients and their threads), `load.rs`
//! (one run), `report.rs` (its figures and output), `matrix.rs` (`--matrix`), `reflector.rs` (the
//! spawned reflector), `callgrind.rs` (`--callgrind`), `system.rs` (/proc, open-file limit).
//!
//! The run is: connect and join every client, `--warmup` seconds of load that are not measured,
//! `--seconds` of measured load, then at most `--drain-ms` for the last events to arrive. Events
//! *sent* in the measured window count. It prints per-second progress on stderr, then one summary
//! line and one Markdown table row on stdout (`--header` adds the table header):
//!
//! | column | meaning |
//! |---|---|
//! | p50 / p99 / max | send → delivered to every client of the session, over the window's events |
//! | delivered/s | deliveries (events × receivers) of the window's events, per second |
//! | reflector CPU | utime + stime of the reflector process over the window, % of one core |
//! | µs/delivery | reflector CPU time per delivered message |
//! | tool CPU | this tool's own CPU over the window (clients share the machine with the reflector) |
//!
//! Events that some client of the session has not received by the end are reported as
//! `incomplete` (they are not in the percentiles); a run with incomplete events, errors or
//! disconnections did not sustain its load; the exit status is then 2. The clients answer the reflector's snapshot requests
//! (hash vote, and a small sealed snapshot when elected), so long runs do not fill its buffer.
//!
//! Loopback only, bounded: the tool stops by itself and stops the reflector it spawned. The summary
//! line also gives the reflector's resident memory (`/proc/PID/status` `VmRSS`) before any client
//! connected, once all joined (the window's start), at the end, and its peak (`VmHWM`).
//!
//! A spawned reflector gets `--max-clients`, `--max-connections-per-ip` and
//! `--max-sessions-per-origin` sized for the run, and `--max-events-per-second=10000` when `E` is
//! above its default limit (60/s per client); a `--reflector-arg` naming the same flag wins. The
//! clients' sockets get the same 4 MiB buffers as a real client's. A client whose connection
//! attempt netcode gives up on is tried again (counted in the summary) until the connect deadline
//! (20 s; 10 min under `--callgrind`), which the reflector also gets as `--join-timeout-ms` (its
//! default, 5 s, closes connections of a thousand simultaneous joins before they are served).
//!
//! # Limits
//!
//! The tool raises its open-file limit to the hard limit at start (one socket per client; a spawned
//! reflector inherits it). `S × N` must fit both the reflector's connection limit
//! ([`MAX_CLIENTS_LIMIT`], 1,024 as of this writing) and the open files; a run that does not fit is
//! refused with the reason (in the matrix, its row says `not run: …`).
//!
//! # The matrix (`--matrix`)
//!
//! `synq-load --matrix` runs the standard configurations, each against a reflector it spawns
//! afresh, `--matrix-seconds` (default 10) measured after `--warmup`, and prints ONE Markdown table
//! on stdout (each row's summary line goes to stderr). `--matrix-rows 1x2x20,idle` runs a subset
//! (`--matrix-rows list` lists the ids); `--reflector-arg` passes through to every row's reflector.
//!
//! | id | config | what it shows |
//! |---|---|---|
//! | `1x2x20` | 1 session × 2 clients × 20 events/s | latency floor of a small game |
//! | `1x32x20` … `1x32x500` | 1 × 32 at 20, 50, 100, 200, 300, 500/s | one big session up to saturation |
//! | `10x8x50` | 10 × 8 × 50/s | a few mid-sized sessions |
//! | `100x4x20` | 100 × 4 × 20/s | many small sessions (cost per connection) |
//! | `idle` | 1,000 sessions × 2 clients, no events | what an idle session costs: reflector CPU % and resident KiB per session |
//! | `overload` | 1 × 32 × 1000/s, 240-byte payloads | above saturation: what still gets through, p99, peak RSS |
//!
//! Columns: **delivered/s** (deliveries of the window's events per second); **p50 / p99 / max**
//! (ms, send → delivered to every client of the session); **reflector CPU %** (utime + stime over
//! the window, % of one core); **µs CPU/delivery** (reflector CPU time / deliveries: the cost per
//! message, lower is better; at low rates it is dominated by the loop's fixed cost); **reflector
//! RSS MB** (`VmRSS` at the window's end; the idle row adds KiB per session = (`VmRSS` once all
//! joined and settled − `VmRSS` before any client connected) / sessions, the overload row the peak
//! `VmHWM`); **clean?** (`yes`, or what went wrong: events some client never got (`incomplete`),
//! errors from the reflector by code, disconnections). A row that is not clean did not sustain its
//! load: read its latency as "fell behind", not as a latency. The idle row's reflector still sends
//! every session's heartbeat ticks (20/s with the default `--tick-ms 50`); those are not counted as
//! deliveries. The idle row needs 2,000 connections: while the reflector accepts at most 1,024 it
//! says `not run`; run `synq-load --spawn -s 500 -n 2 -e 0` for the same figures at 500 sessions.
//!
//! The tool's clients share the machine with the reflector (2 cores here): on a busy machine the
//! tails (p99, max) mostly measure scheduling; compare rows from the same run, and rerun rows that
//! look odd. Late-join rows (a client joining a loaded session: time to sync, snapshot size) are
//! measured by another tool and are not part of this table; put them next to it when reporting.
//!
//! # Instruction counts (`--callgrind`)
//!
//! `perf stat` counters are not available everywhere (not on our CI VMs); valgrind is. With
//! `--callgrind` (needs `--spawn` or `--matrix`) the reflector runs under `valgrind
//! --tool=callgrind`; the tool zeroes callgrind's counters at the window's start and dumps them at
//! its end (`vgdb`), so the count covers the measured window only (to about 0.1 s), and reports
//! instructions per delivered message (per session-second for an idle run). Under valgrind the
//! reflector runs roughly 30–50× slower: measure at reduced rates (`-e`, or `--matrix-rate-scale`
//! for the matrix) and distrust any run that is not clean (`incomplete` events mean the reflector
//! fell behind, and its count then covers less work than was offered). The loop's fixed per-wake-up
//! cost also shrinks under valgrind (fewer wake-ups per second), so instructions per delivery at
//! very low rates are a lower bound. Callgrind's files are kept (`--callgrind-dir`, default the temp
//! dir) for `callgrind_annotate`; memory figures under callgrind are valgrind's, not the
//! reflector's. Joins are slow under valgrind (hundreds of ms each). Instructions per delivery include the loop's fixed cost (wake-ups,
//! heartbeat ticks: the idle run's figure); the marginal cost of a delivery is the difference
//! between a loaded run and an idle run of the same S × N, divided by the deliveries.
//!
//! ```text
//! synq-load --spawn --callgrind -s 1 -n 2 -e 20
//! synq-load --spawn --callgrind -s 100 -n 4 -e 2       # 100 × 4 × 20/s at a tenth of the rate
//! synq-load --spawn --callgrind -s 100 -n 2 -e 0       # idle: instructions per session-second
//! synq-load --matrix --callgrind --matrix-rate-scale 0.05 --matrix-rows 1x2x20,1x32x100
//! ```
//!
//! [`MAX_CLIENTS_LIMIT`]: synq_reflector::server::MAX_CLIENTS_LIMIT

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

mod args;
mod callgrind;
mod client;
mod load;
mod matrix;
mod reflector;
mod report;
mod system;

use args::Args;
use report::Report;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("synq-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs what `args` asks for; `Ok(false)` when a load was not sustained cleanly.
fn run(args: &Args) -> Result<bool, String> {
    let open_files = system::raise_open_files_limit()?;
    if args.matrix {
        return matrix::run(args, open_files);
    }
    let report = load::run(args, open_files, "run")?;
    println!("{}", report.summary_line());
    if args.header {
        println!("{}", Report::TABLE_HEADER);
    }
    println!("{}", report.table_row());
    Ok(report.clean())
}

/// Sleeps until `t` (at once if it passed).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
