//! Real `nats-server` processes with JetStream for the cluster storage tests: a cluster of nodes
//! on free loopback ports, each with its own storage directory, killed and removed when dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The `nats-server` binary, if installed (on `PATH` or where Debian's package puts it).
fn nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// Whether the cluster tests can run: `nats-server` is installed. Without it the tests fail
/// with a message saying to install it, unless `SYNQ_SKIP_NATS=1`, which skips them (the
/// caller returns early) with the reason printed.
pub fn nats_available(test: &str) -> bool {
    if nats_server().is_some() {
        return true;
    }
    if std::env::var("SYNQ_SKIP_NATS").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: nats-server is not installed and SYNQ_SKIP_NATS=1");
        return false;
    }
    panic!(
        "{test} needs nats-server (JetStream) on PATH: install it (Debian: `apt-get install nats-server`), or set \
         SYNQ_SKIP_NATS=1 to skip the cluster tests"
    );
}

/// A free loopback TCP port (bound, then released for the server to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A JetStream cluster of `nats-server` processes on loopback.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

struct Node {
    child: Option<Child>,
    client_port: u16,
    monitor_port: u16,
    args: Vec<String>,
}

impl NatsCluster {
    /// Starts `size` nodes (one: a single server without clustering) and waits until each
    /// accepts client connections. JetStream may still be electing its leader: clients retry
    /// (see `JetStreamStorage::connect`).
    pub fn start(name: &str, size: usize) -> Self {
        let binary = nats_server().expect("checked by nats_available");
        let dir = std::env::temp_dir().join(format!("synq-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect();
        let mut nodes = Vec::new();
        for k in 0..size {
            let mut args: Vec<String> = vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                client_ports[k].to_string(),
                "-m".into(),
                monitor_ports[k].to_string(),
                "-sd".into(),
                dir.join(format!("node{k}")).display().to_string(),
                "-n".into(),
                format!("node{k}"),
                "-l".into(),
                dir.join(format!("node{k}.log")).display().to_string(),
            ];
            if size > 1 {
                args.extend([
                    "--cluster_name".into(),
                    format!("synq-{name}"),
                    "--cluster".into(),
                    routes[k].clone(),
                    "--routes".into(),
                    routes
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != k)
                        .map(|(_, r)| r.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            let child = spawn(&binary, &args);
            nodes.push(Node { child: Some(child), client_port: client_ports[k], monitor_port: monitor_ports[k], args });
        }
        let cluster = Self { nodes, dir };
        for k in 0..size {
            cluster.wait_accepting(k);
        }
        cluster
    }

    fn wait_accepting(&self, k: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.nodes[k].client_port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nats-server node{k} did not start; log: {}", self.log(k));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|node| format!("nats://127.0.0.1:{}", node.client_port)).collect()
    }

    /// The client URLs joined by commas (as `synq-reflector --cluster` takes them).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Kills node `k` with SIGKILL (its storage directory stays).
    pub fn kill(&mut self, k: usize) {
        if let Some(mut child) = self.nodes[k].child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts node `k` again after [`NatsCluster::kill`], with the same ports and directory.
    pub fn restart(&mut self, k: usize) {
        assert!(self.nodes[k].child.is_none(), "node{k} is running");
        let binary = nats_server().expect("checked by nats_available");
        self.nodes[k].child = Some(spawn(&binary, &self.nodes[k].args));
        self.wait_accepting(k);
    }

    /// Node `k`'s HTTP monitoring port (`/jsz`, `/varz`, …), for debugging.
    pub fn monitor_port(&self, k: usize) -> u16 {
        self.nodes[k].monitor_port
    }

    /// Node `k`'s log.
    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node{k}.log"))).unwrap_or_default()
    }

    /// The directory holding the nodes' storage and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn spawn(binary: &Path, args: &[String]) -> Child {
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for k in 0..self.nodes.len() {
            if let Some(mut child) = self.nodes[k].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
