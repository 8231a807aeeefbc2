//! Command-line options.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use synq_protocol::udp::DEFAULT_PROTOCOL_ID;

/// Load generator for synq-reflector: S sessions × N clients × E events/s, end-to-end latency.
#[derive(Parser, Debug, Clone)]
#[command(name = "synq-load", version, about)]
pub(crate) struct Args {
    /// Address of a running reflector (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:5800")]
    pub(crate) reflector: SocketAddr,
    /// Start a synq-reflector (the binary next to this one) on a free loopback port instead.
    #[arg(long)]
    pub(crate) spawn: bool,
    /// Extra argument for the spawned reflector (repeatable), e.g. `--reflector-arg=--idle-sleep-us=0`.
    /// The tool itself passes `--max-clients`, `--max-connections-per-ip`,
    /// `--max-sessions-per-origin` sized for the run, `--join-timeout-ms`, and `--max-events-per-second=10000` when the
    /// rate is above the reflector's default limit; a flag given here replaces the tool's.
    #[arg(long = "reflector-arg", allow_hyphen_values = true)]
    pub(crate) reflector_args: Vec<String>,
    /// pid of the running reflector, to measure its CPU use (not needed with --spawn).
    #[arg(long)]
    pub(crate) reflector_pid: Option<u32>,
    /// Number of sessions (S).
    #[arg(long, short = 's', default_value_t = 1)]
    pub(crate) sessions: u32,
    /// Clients per session (N).
    #[arg(long, short = 'n', default_value_t = 2)]
    pub(crate) clients: u32,
    /// Events per second sent by each client (E).
    #[arg(long, short = 'e', default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Sealed payload size in bytes (ciphertext, after the 24-byte nonce); at least 16.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=16 * 1024))]
    pub(crate) payload_bytes: u32,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    /// Unmeasured load before the measured window, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) warmup: f64,
    /// Longest wait for the last events after sending stopped, ms.
    #[arg(long, default_value_t = 2000)]
    pub(crate) drain_ms: u64,
    /// Threads that drive the clients (clients are spread round-robin).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) threads: u32,
    /// netcode protocol id (must match the reflector's).
    #[arg(long, default_value_t = DEFAULT_PROTOCOL_ID)]
    pub(crate) protocol_id: u64,
    /// Every client flushes (acks, resends, keep-alives) at least this often, in ms, even with
    /// nothing to send. Between flushes a client reads what arrives at once but only sends when it
    /// has messages: flushing on every datagram starts an ack ping-pong with the reflector, which
    /// answers every datagram with acks of its own. Keep it well under renet's 100 ms resend time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=80))]
    pub(crate) flush_ms: u64,
    /// Print the Markdown table header before the row.
    #[arg(long)]
    pub(crate) header: bool,
    /// No per-second progress on stderr.
    #[arg(long, short = 'q')]
    pub(crate) quiet: bool,
    /// Run the standard matrix (see the tool's documentation) against a reflector spawned afresh
    /// for each row, and print one Markdown table on stdout. Implies --spawn; ignores -s/-n/-e,
    /// --payload-bytes, --seconds and --header.
    #[arg(long)]
    pub(crate) matrix: bool,
    /// Measured duration of each matrix row, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) matrix_seconds: f64,
    /// Run only these matrix rows (comma-separated ids, e.g. `1x2x20,idle`; `--matrix-rows list`
    /// prints the ids).
    #[arg(long, value_delimiter = ',')]
    pub(crate) matrix_rows: Vec<String>,
    /// Multiply every matrix row's event rate by this (e.g. 0.05 with --callgrind, which slows the
    /// reflector 30-50×); the config column shows the rate actually run.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) matrix_rate_scale: f64,
    /// Run the spawned reflector under `valgrind --tool=callgrind` and report the instructions it
    /// executed during the measured window (per delivered message; per session-second when idle).
    /// Needs valgrind and vgdb; the reflector runs 30-50× slower, so use low rates.
    #[arg(long)]
    pub(crate) callgrind: bool,
    /// Where callgrind's output files go (kept for `callgrind_annotate`; default: the temp dir).
    #[arg(long)]
    pub(crate) callgrind_dir: Option<PathBuf>,
}

impl Args {
    /// Whether `--reflector-arg` already gives the reflector `flag` (as `flag` or `flag=value`).
    pub(crate) fn reflector_has(&self, flag: &str) -> bool {
        self.reflector_args.iter().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
    }
}
