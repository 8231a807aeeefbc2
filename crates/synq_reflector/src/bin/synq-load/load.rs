//! One load run: connect and join every client, warm up, measure, drain, and gather the figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use synq_reflector::server::MAX_CLIENTS_LIMIT;

use crate::args::Args;
use crate::callgrind::Callgrind;
use crate::client::{Shared, Slot, ThreadStats, client_thread};
use crate::reflector::Spawned;
use crate::report::{Latency, Report};
use crate::system::{cpu_seconds, loadavg, machine_jiffies, memory, udp_counters};

/// Open files the tool keeps for itself besides the client sockets and the threads' epoll sets
/// (standard streams, the reflector's pipe, /proc reads, valgrind's helpers).
const FILES_RESERVE: u64 = 64;

/// How many clients one run may have: the reflector's connection limit
/// ([`MAX_CLIENTS_LIMIT`]) and what the open-file limit leaves for one socket per client.
fn client_limit(open_files: Option<u64>, threads: u32) -> usize {
    let by_files = open_files.map_or(usize::MAX, |n| n.saturating_sub(FILES_RESERVE + threads as u64) as usize);
    MAX_CLIENTS_LIMIT.min(by_files)
}

/// Why `total` clients do not fit, if they do not.
pub(crate) fn check_fits(total: u64, open_files: Option<u64>, threads: u32) -> Result<(), String> {
    let limit = client_limit(open_files, threads);
    if total <= limit as u64 {
        return Ok(());
    }
    if total > MAX_CLIENTS_LIMIT as u64 {
        Err(format!(
            "{total} clients do not fit: the reflector accepts at most {MAX_CLIENTS_LIMIT} connections \
             (synq_reflector::server::MAX_CLIENTS_LIMIT)"
        ))
    } else {
        Err(format!(
            "{total} clients do not fit: the open-file limit ({}) leaves room for {limit} client sockets; \
             raise the hard limit (ulimit -Hn) and retry",
            open_files.unwrap_or(0)
        ))
    }
}

/// Runs the load `args` describes (`label` names the callgrind file); an error when it could not
/// run at all.
pub(crate) fn run(args: &Args, open_files: Option<u64>, label: &str) -> Result<Report, String> {
    let total = args.sessions.checked_mul(args.clients).filter(|t| *t > 0).ok_or("need at least one client")?;
    check_fits(total as u64, open_files, args.threads)?;
    if !(args.rate >= 0.0 && args.rate.is_finite() && args.seconds > 0.0 && args.warmup >= 0.0) {
        return Err("rate, seconds and warmup must be positive".into());
    }
    let per_sender = (args.rate * (args.warmup + args.seconds) + args.rate + 16.0).ceil() as usize;
    if per_sender.saturating_mul(total as usize) > 100_000_000 {
        return Err("too many events for the bookkeeping (rate × duration × clients > 1e8)".into());
    }
    if args.callgrind && !args.spawn {
        return Err("--callgrind needs --spawn (the tool starts the reflector under valgrind)".into());
    }
    let callgrind =
        args.callgrind.then(|| Callgrind::new(&args.callgrind_dir.clone().unwrap_or_else(std::env::temp_dir), label));
    let mut spawned = if args.spawn {
        Some(Spawned::start(args, args.sessions, args.clients, args.rate, callgrind.as_ref())?)
    } else {
        None
    };
    let addr: SocketAddr = spawned.as_ref().map_or(args.reflector, |s| s.addr);
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; synq-load only loads loopback"));
    }
    let reflector_pid = spawned.as_ref().map(|s| s.pid()).or(args.reflector_pid).map(|p| p.to_string());
    let loadavg = loadavg();
    let memory_before = reflector_pid.as_deref().and_then(memory);

    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        table: (0..total).map(|_| (0..per_sender).map(|_| Slot::default()).collect()).collect(),
        start_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        send_end_ns: AtomicU64::new(0),
    });
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        ^ ((std::process::id() as u64) << 40);
    let run_id = run_id & !0xFF_FFFF_FFFF; // room for the attempt and the client index in netcode ids
    let threads = args.threads.min(total);
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let connect_start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let indices: Vec<u32> = (t..total).step_by(threads as usize).collect();
            let (args, shared, barrier) = (args.clone(), shared.clone(), barrier.clone());
            std::thread::Builder::new()
                .name(format!("synq-load-{t}"))
                .spawn(move || client_thread(args, addr, indices, run_id, shared, barrier))
                .map_err(|e| format!("cannot start a client thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    barrier.wait();
    let connect_time = connect_start.elapsed();
    let start = Instant::now() + Duration::from_millis(20);
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let window_end = window_start + Duration::from_secs_f64(args.seconds);
    shared.start_ns.store(shared.ns(start), Ordering::Relaxed);
    shared.send_end_ns.store(shared.ns(window_end), Ordering::Relaxed);
    barrier.wait();
    if shared.abort.load(Ordering::Relaxed) {
        let failures: Vec<String> = handles.into_iter().filter_map(|h| h.join().ok().and_then(|s| s.failure)).collect();
        return Err(failures.join("; "));
    }
    if !args.quiet {
        eprintln!("synq-load: {total} clients connected and joined in {connect_time:.2?}; load starts");
    }

    // Progress, and CPU samples at the window's edges.
    let progress = |label: &str, last: &mut (Instant, u64, u64, Option<f64>)| {
        let now = Instant::now();
        let (sent, delivered) = (shared.sent.load(Ordering::Relaxed), shared.delivered.load(Ordering::Relaxed));
        let cpu = reflector_pid.as_deref().and_then(cpu_seconds);
        let dt = (now - last.0).as_secs_f64();
        if !args.quiet && dt > 0.0 {
            let cpu_text = match (cpu, last.3) {
                (Some(b), Some(a)) => format!("{:.0} %", (b - a) / dt * 100.0),
                _ => "n/a".into(),
            };
            eprintln!(
                "  {label:>7}: sent {:>9.0}/s  delivered {:>10.0}/s  reflector CPU {cpu_text}",
                (sent - last.1) as f64 / dt,
                (delivered - last.2) as f64 / dt
            );
        }
        *last = (now, sent, delivered, cpu);
    };
    let mut last = (Instant::now(), 0, 0, reflector_pid.as_deref().and_then(cpu_seconds));
    let mut tick = start;
    while tick + Duration::from_secs(1) <= window_start {
        tick += Duration::from_secs(1);
        crate::sleep_until(tick);
        progress("warm-up", &mut last);
    }
    crate::sleep_until(window_start);
    let memory_settled = reflector_pid.as_deref().and_then(memory);
    let instructions_zeroed = match (&callgrind, &spawned) {
        (Some(callgrind), Some(spawned)) => Some(callgrind.zero(spawned.pid())),
        _ => None,
    };
    let cpu_start = reflector_pid.as_deref().and_then(cpu_seconds);
    let self_start = cpu_seconds("self");
    let machine_start = machine_jiffies();
    let udp_start = udp_counters();
    let mut tick = window_start;
    while tick + Duration::from_secs(1) <= window_end {
        tick += Duration::from_secs(1);
        crate::sleep_until(tick);
        progress("load", &mut last);
    }
    crate::sleep_until(window_end);
    let cpu_end = reflector_pid.as_deref().and_then(cpu_seconds);
    let self_end = cpu_seconds("self");
    let machine_end = machine_jiffies();
    let udp_end = udp_counters();
    let instructions = match (&callgrind, &spawned, instructions_zeroed) {
        (Some(callgrind), Some(spawned), Some(zeroed)) => Some(zeroed.and_then(|()| callgrind.dump(spawned.pid()))),
        _ => None,
    };
    let memory_end = reflector_pid.as_deref().and_then(memory);
    // Drain: wait until every sent event reached every receiver, or the drain time passed.
    let drain_end = Instant::now() + Duration::from_millis(args.drain_ms);
    while Instant::now() < drain_end {
        let expected = shared.sent.load(Ordering::Relaxed) * args.clients as u64;
        if shared.delivered.load(Ordering::Relaxed) >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let memory_peak = reflector_pid.as_deref().and_then(memory).map(|m| m.peak_kib);
    shared.stop.store(true, Ordering::Relaxed);
    let mut stats = ThreadStats::default();
    for handle in handles {
        let s = handle.join().map_err(|_| "a client thread panicked")?;
        for (k, v) in s.errors {
            *stats.errors.entry(k).or_default() += v;
        }
        stats.disconnected += s.disconnected;
        stats.transport_errors += s.transport_errors;
        stats.max_send_lag = stats.max_send_lag.max(s.max_send_lag);
        stats.late_sends += s.late_sends;
        stats.snapshots_uploaded += s.snapshots_uploaded;
        stats.connect_retries += s.connect_retries;
    }
    let reflector_exit = spawned.as_mut().map(|s| match s.stop() {
        Some(status) if status.success() => "stopped gracefully".to_string(),
        Some(status) => format!("exited with {status}"),
        None => "did not stop within its grace time and was killed".to_string(),
    });
    drop(spawned);

    // Latencies of the events sent in the window.
    let (ws, we) = (shared.ns(window_start), shared.ns(window_end));
    let receivers = args.clients;
    let mut latencies = Vec::new();
    let (mut sent, mut incomplete, mut deliveries) = (0u64, 0u64, 0u64);
    for row in &shared.table {
        for slot in row.iter() {
            let s = slot.sent.load(Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            let s = s - 1;
            if s < ws || s >= we {
                continue;
            }
            sent += 1;
            let got = slot.receivers.load(Ordering::Relaxed);
            deliveries += got.min(receivers) as u64;
            if got >= receivers {
                latencies.push(slot.last_received.load(Ordering::Relaxed).saturating_sub(s));
            } else {
                incomplete += 1;
            }
        }
    }
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    Ok(Report {
        sessions: args.sessions,
        clients: args.clients,
        rate: args.rate,
        payload_bytes: args.payload_bytes,
        warmup: args.warmup,
        secs: (window_end - window_start).as_secs_f64(),
        connect_time,
        sent,
        deliveries,
        incomplete,
        latency: Latency::of(latencies),
        stats,
        reflector_cpu: diff(cpu_start, cpu_end),
        tool_cpu: diff(self_start, self_end),
        machine_busy: match (machine_start, machine_end) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0),
            _ => None,
        },
        udp: udp_start.zip(udp_end).map(|(a, b)| [b[0] - a[0], b[1] - a[1], b[2] - a[2]]),
        loadavg,
        memory_before,
        memory_settled,
        memory_end,
        memory_peak,
        instructions,
        callgrind_file: callgrind.map(|c| c.window_file()),
        reflector_exit,
    })
}
