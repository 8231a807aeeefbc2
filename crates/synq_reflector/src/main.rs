//! `synq-reflector`: the bevy_synq reflector as a UDP server.
//!
//! ```text
//! synq-reflector --listen 127.0.0.1:5800 --data-dir ./synq-data
//! synq-reflector --listen 127.0.0.1:5800 --cluster nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222
//! ```
//!
//! With `--cluster`, sessions are kept in a NATS JetStream cluster instead of a data directory,
//! so that another reflector can resume the sessions of one that died (see `docs/cluster.md`).
//!
//! Once bound it prints `synq-reflector listening on udp://ADDR` on stdout. Logs go to stderr; `RUST_LOG` filters them (default `info,renetcode=off`: renetcode logs one error per
//! packet it refuses, which anyone can turn into gigabytes of logs; those errors are counted and
//! reported as one line every 10 s instead). Ctrl-C or SIGTERM stops it
//! gracefully: every client is told [`ErrorCode::ShuttingDown`], then it exits with status 0.
//! A second signal exits at once.
//!
//! Access control: with one or more `--api-key APP_ID=KEY`, only clients of those apps presenting
//! one of their keys are admitted; without any, every app is (and a warning says so).
//!
//! Backup and restore of persisted data (decrypted locally with the session password; run them
//! while the reflector is stopped):
//!
//! ```text
//! synq-reflector persisted export --data-dir ./synq-data --app-id io.example.game --name lobby --password … > backup.json
//! synq-reflector persisted import --data-dir ./synq-data --app-id io.example.game --name lobby --password … backup.json
//! ```
//!
//! [`ErrorCode::ShuttingDown`]: synq_protocol::wire::ErrorCode::ShuttingDown

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use synq_reflector::storage::{JetStreamOptions, JetStreamStorage, Storage};
use synq_reflector::{AccessControl, ReflectorConfig};

mod persisted_cli;
use synq_protocol::udp::{CHANNEL_MEMORY_BYTES, DEFAULT_PROTOCOL_ID};
use synq_reflector::server::{
    DEFAULT_JOIN_TIMEOUT, DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MAX_SENDER_BACKLOG_BYTES,
    MAX_CLIENTS_LIMIT, UdpReflector, UdpReflectorConfig, netcode_error_counter,
};
use tracing_subscriber::prelude::*;

/// The log filter when `RUST_LOG` is not set: renetcode's per-packet errors are counted, not
/// printed.
const DEFAULT_LOG_FILTER: &str = "info,renetcode=off";

/// The bevy_synq reflector: orders, stamps and relays encrypted events; never runs game code.
#[derive(Parser, Debug)]
#[command(name = "synq-reflector", version, about)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Directory for sessions' snapshots and persisted data (created if missing).
    #[arg(long, default_value = "./synq-data")]
    data_dir: PathBuf,
    /// Keep sessions in a NATS JetStream cluster instead of a data directory: its servers' URLs,
    /// comma-separated (nats://HOST:PORT,...). The stream and buckets are created if missing.
    #[arg(long, value_name = "URLS", value_delimiter = ',', conflicts_with = "data_dir")]
    cluster: Vec<String>,
    /// Replicas of the JetStream stream and buckets created with --cluster (default: 3 on a
    /// clustered server, 1 on a single one).
    #[arg(long, requires = "cluster", value_parser = clap::value_parser!(u64).range(1..=5))]
    cluster_replicas: Option<u64>,
    /// With --cluster: the address clients reach this reflector at, which the other reflectors
    /// send the clients of this reflector's sessions to (default: the address it listens on,
    /// which must then not be 0.0.0.0 or [::]).
    #[arg(long, requires = "cluster")]
    advertise: Option<SocketAddr>,
    /// With --cluster: how long this reflector's claim on a session lasts unless renewed (every
    /// third of it). When a reflector dies, another takes its sessions over this long after its
    /// last renewal.
    #[arg(long, requires = "cluster", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    claim_ttl_ms: u64,
    /// Heartbeat tick period (ms) for sessions whose creator asks for none.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(10..=30_000))]
    tick_ms: u32,
    /// Most simultaneous connections.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=MAX_CLIENTS_LIMIT as u64))]
    max_clients: u64,
    /// netcode protocol id; clients must use the same one.
    #[arg(long, default_value_t = DEFAULT_PROTOCOL_ID)]
    protocol_id: u64,
    /// Longest wait for a datagram between loop iterations, in µs (timers and resends run at least
    /// this often; 0 = busy loop).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    idle_sleep_us: u64,
    /// Admit clients of APP_ID presenting KEY (repeatable; several keys per app allowed). Without
    /// any, every app is admitted.
    #[arg(long = "api-key", value_name = "APP_ID=KEY", value_parser = parse_api_key)]
    api_keys: Vec<(String, String)>,
    /// Queued frames are flushed at most every this many µs (several then share a datagram per
    /// connection); 0 flushes at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=20_000))]
    frame_flush_us: u64,
    /// Most events one client may send per second; more are refused.
    #[arg(long, default_value_t = 60)]
    max_events_per_second: u32,
    /// A connection that has not joined a session (proved its membership) within this many ms is
    /// closed.
    #[arg(long, default_value_t = DEFAULT_JOIN_TIMEOUT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    join_timeout_ms: u64,
    /// Most simultaneous connections from one IP address; more are disconnected at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP as u64, value_parser = clap::value_parser!(u64).range(1..=MAX_CLIENTS_LIMIT as u64))]
    max_connections_per_ip: u64,
    /// Most sessions held in memory; joins that would load more are refused (idle ones are
    /// unloaded first).
    #[arg(long, default_value_t = ReflectorConfig::default().max_sessions)]
    max_sessions: usize,
    /// Most sessions opened from one IP address and held in memory at once.
    #[arg(long, default_value_t = ReflectorConfig::default().max_sessions_per_origin)]
    max_sessions_per_origin: usize,
    /// A session without clients is unloaded from memory after this many ms (it stays on disk).
    #[arg(long, default_value_t = ReflectorConfig::default().idle_unload_ms)]
    idle_unload_ms: u64,
    /// Most MiB of events one session may buffer between snapshots.
    #[arg(long, default_value_t = ReflectorConfig::default().max_buffered_bytes >> 20)]
    max_session_buffer_mib: usize,
    /// Most MiB of events, snapshots and persisted data held in memory over all sessions.
    #[arg(long, default_value_t = ReflectorConfig::default().memory_budget_bytes >> 20)]
    memory_budget_mib: usize,
    /// A client's events are refused (RateLimited, "the reflector is overloaded") while its
    /// connection holds more than this many KiB unacknowledged or queued.
    #[arg(long, default_value_t = (DEFAULT_MAX_SENDER_BACKLOG_BYTES >> 10) as u64, value_parser = clap::value_parser!(u64).range(1..=(CHANNEL_MEMORY_BYTES >> 10) as u64))]
    max_sender_backlog_kib: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Back up or restore the persisted data of a session name.
    Persisted {
        #[command(subcommand)]
        action: persisted_cli::Action,
    },
}

fn parse_api_key(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((app, key)) if !app.is_empty() && !key.is_empty() => Ok((app.to_string(), key.to_string())),
        _ => Err(format!("expected APP_ID=KEY, got {text:?}")),
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .with(netcode_error_counter())
        .init();
    let args = Args::parse();
    if let Some(Command::Persisted { action }) = args.command {
        return persisted_cli::run(action);
    }

    if args.cluster.is_empty() {
        tracing::info!(data_dir = %args.data_dir.display(), "data directory");
    } else if args.advertise.is_none() && args.listen.ip().is_unspecified() {
        tracing::error!("--cluster with --listen {}: give --advertise, the address clients reach", args.listen);
        return ExitCode::FAILURE;
    }
    let access = if args.api_keys.is_empty() {
        tracing::warn!("no --api-key given: every app is admitted");
        AccessControl::Open
    } else {
        let mut keys = std::collections::HashMap::<String, Vec<String>>::new();
        for (app, key) in &args.api_keys {
            keys.entry(app.clone()).or_default().push(key.clone());
        }
        tracing::info!(apps = keys.len(), "access control: API keys");
        AccessControl::ApiKeys(keys)
    };

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            // Second signal: give up on the graceful shutdown.
            std::process::exit(130);
        }
    }) {
        tracing::error!("cannot install the signal handler: {e}");
        return ExitCode::FAILURE;
    }

    let config = UdpReflectorConfig {
        listen: args.listen,
        protocol_id: args.protocol_id,
        max_clients: args.max_clients as usize,
        idle_sleep: Duration::from_micros(args.idle_sleep_us),
        reflector: ReflectorConfig {
            default_tick_ms: args.tick_ms,
            max_events_per_second: args.max_events_per_second,
            access,
            max_sessions: args.max_sessions,
            max_sessions_per_origin: args.max_sessions_per_origin,
            idle_unload_ms: args.idle_unload_ms,
            max_buffered_bytes: args.max_session_buffer_mib << 20,
            memory_budget_bytes: args.memory_budget_mib << 20,
            ..ReflectorConfig::default()
        },
        data_dir: args.cluster.is_empty().then(|| args.data_dir.clone()),
        frame_flush: Duration::from_micros(args.frame_flush_us),
        join_timeout: Duration::from_millis(args.join_timeout_ms),
        max_connections_per_ip: args.max_connections_per_ip as usize,
        max_sender_backlog_bytes: (args.max_sender_backlog_kib as usize) << 10,
    };
    let bound = if args.cluster.is_empty() {
        UdpReflector::bind(config)
    } else {
        UdpReflector::bind_with_storage(config, |bound| {
            // Other reflectors of the cluster send clients here: the address they reach.
            let advertise = args.advertise.unwrap_or(bound);
            let options = JetStreamOptions {
                replicas: args.cluster_replicas.map(|r| r as usize),
                advertise: Some(advertise),
                claim_ttl: Duration::from_millis(args.claim_ttl_ms),
                ..Default::default()
            };
            let storage = JetStreamStorage::connect(&args.cluster, options)?;
            tracing::info!(servers = ?args.cluster, %advertise, "sessions kept in the NATS JetStream cluster");
            Ok(Box::new(storage) as Box<dyn Storage>)
        })
    };
    let mut reflector = match bound {
        Ok(reflector) => reflector,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // One machine-readable line on stdout, e.g. for scripts that asked for port 0.
    println!("synq-reflector listening on udp://{}", reflector.local_addr());
    reflector.run(&stop);
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
