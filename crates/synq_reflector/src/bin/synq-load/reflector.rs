//! A `synq-reflector` process started by the tool (`--spawn`, every matrix row), optionally under
//! callgrind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use synq_reflector::ReflectorConfig;
use synq_reflector::server::MAX_CLIENTS_LIMIT;

use crate::args::Args;
use crate::callgrind::Callgrind;

/// The per-client event limit the tool gives a spawned reflector when the load's rate is above the
/// reflector's default.
const HIGH_EVENT_LIMIT: u32 = 10_000;

/// A `synq-reflector` process started by the tool; stopped gracefully (SIGTERM) when dropped.
pub(crate) struct Spawned {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    data_dir: PathBuf,
    /// How long a graceful stop may take before it is killed.
    stop_grace: Duration,
    /// Set once stopped: how it exited (`None`: it had to be killed).
    stopped: Option<Option<ExitStatus>>,
}

impl Spawned {
    /// Starts the `synq-reflector` next to this binary for `sessions` × `clients` clients sending
    /// `rate` events/s each, under `callgrind` if given.
    pub(crate) fn start(
        args: &Args,
        sessions: u32,
        clients: u32,
        rate: f64,
        callgrind: Option<&Callgrind>,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?.with_file_name("synq-reflector");
        static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data_dir = std::env::temp_dir().join(format!("synq-load-{}-{run}", std::process::id()));
        let total = sessions.saturating_mul(clients).max(2);
        // Room for connection attempts that were given up on (see `client.rs`) while the
        // reflector still holds their slots.
        let slots = total.saturating_mul(2).min(MAX_CLIENTS_LIMIT as u32).max(total);
        let mut flags = vec![
            ("--max-clients", slots.to_string()),
            ("--max-connections-per-ip", slots.to_string()),
            ("--max-sessions-per-origin", sessions.max(1).to_string()),
        ];
        if rate > ReflectorConfig::default().max_events_per_second as f64 {
            flags.push(("--max-events-per-second", HIGH_EVENT_LIMIT.max(rate.ceil() as u32 * 2).to_string()));
        }
        // A connection must join within the reflector's join timeout (5 s by default), but a
        // thousand joins at once (or a reflector under valgrind) take longer: give it the tool's
        // own connect deadline.
        let connect_deadline = crate::client::connect_timeout(callgrind.is_some());
        flags.push(("--join-timeout-ms", connect_deadline.as_millis().to_string()));
        let mut command = match callgrind {
            Some(callgrind) => callgrind.command(&exe),
            None => Command::new(&exe),
        };
        command.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(&data_dir);
        for (flag, value) in flags {
            if !args.reflector_has(flag) {
                command.arg(format!("{flag}={value}"));
            }
        }
        let program = if callgrind.is_some() { "valgrind".into() } else { exe.display().to_string() };
        let mut child = command
            .args(&args.reflector_args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,renetcode=off".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            lines.for_each(drop);
        });
        // Under valgrind the reflector starts (and stops: callgrind writes its file) far slower.
        let slow = if callgrind.is_some() { 20 } else { 1 };
        let mut spawned = Self {
            child,
            addr: "127.0.0.1:0".parse().expect("parses"),
            data_dir,
            stop_grace: Duration::from_secs(3 * slow),
            stopped: None,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(10 * slow))
            .map_err(|_| "synq-reflector did not report its address (see its log above)")?;
        spawned.addr = line
            .rsplit("udp://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| format!("unexpected first line from synq-reflector: {line:?}"))?;
        Ok(spawned)
    }

    /// The process id (valgrind's under callgrind: valgrind runs the reflector in its own process).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the reflector gracefully (SIGTERM; killed if it takes too long) and returns how it
    /// exited (`None`: it had to be killed).
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(exited) = self.stopped {
            return exited;
        }
        #[cfg(unix)]
        {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + self.stop_grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.stopped = Some(Some(status));
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped = Some(None);
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
