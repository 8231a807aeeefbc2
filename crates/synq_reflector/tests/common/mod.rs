//! What the reflector's process tests share: the real `synq-reflector` binary on a free loopback
//! port, with its log collected.
#![allow(dead_code)]

pub mod nats;
pub mod raw_client;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the binary may take to report its address.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `synq-reflector` process on a free loopback port, its stderr collected; killed when dropped.
pub struct ReflectorProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: std::path::PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ReflectorProcess {
    /// Starts the binary with `extra` options and the default log filter (`info,renetcode=off`).
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let data_dir = std::env::temp_dir().join(format!("synq-process-{name}-{}", std::process::id()));
        let storage = [std::ffi::OsStr::new("--data-dir"), data_dir.as_os_str()];
        Self::spawn(&storage, extra, data_dir.clone())
    }

    /// Starts the binary keeping its sessions in the NATS JetStream cluster at `urls`
    /// (comma-separated), with `extra` options.
    pub fn start_cluster(name: &str, urls: &str, extra: &[&str]) -> Self {
        // No data directory is created; the path only names the process in messages.
        let data_dir = std::env::temp_dir().join(format!("synq-process-{name}-{}-unused", std::process::id()));
        Self::spawn(&[std::ffi::OsStr::new("--cluster"), std::ffi::OsStr::new(urls)], extra, data_dir)
    }

    fn spawn(storage: &[&std::ffi::OsStr], extra: &[&str], data_dir: std::path::PathBuf) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_synq-reflector"))
            .args(["--listen", "127.0.0.1:0"])
            .args(storage)
            .args(extra)
            // The binary's default filter (`info,renetcode=off`) is part of what is tested.
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the synq-reflector binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            lines.for_each(drop);
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("synq-reflector did not report its address; log: {:?}", log.lock().unwrap());
            }
        };
        let addr = line.rsplit("udp://").next().and_then(|a| a.trim().parse().ok());
        let addr = addr.unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self { child, addr, data_dir, log }
    }

    /// Panics (with the log) if the process exited.
    pub fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("the child can be polled");
        assert!(status.is_none(), "the reflector exited: {status:?}; log: {:?}", self.log.lock().unwrap());
    }
}

impl Drop for ReflectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
