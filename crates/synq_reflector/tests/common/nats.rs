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

/// `count` distinct free loopback TCP ports (bound together, then released for the servers to
/// take: one at a time, the system may hand out a port just released again).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|listener| listener.local_addr().unwrap().port()).collect()
}

/// Held while a cluster starts: between the moment its ports are released and the moment its
/// servers bound them, another test of the same binary must not pick the same ones.
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Attempts at starting a cluster: a node that exits while starting (a port taken after all)
/// makes the cluster start again on other ports.
const START_ATTEMPTS: u32 = 3;

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
        let _starting = STARTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut attempt = 1;
        loop {
            match Self::try_start(name, size) {
                Ok(cluster) => return cluster,
                Err(reason) if attempt < START_ATTEMPTS => {
                    eprintln!("nats cluster {name}: {reason}; starting it again on other ports");
                    attempt += 1;
                }
                Err(reason) => panic!("nats cluster {name}: {reason}"),
            }
        }
    }

    fn try_start(name: &str, size: usize) -> Result<Self, String> {
        let binary = nats_server().expect("checked by nats_available");
        let dir = std::env::temp_dir().join(format!("synq-nats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ports = free_ports(3 * size);
        let (client_ports, rest) = ports.split_at(size);
        let (cluster_ports, monitor_ports) = rest.split_at(size);
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
            let child = spawn(&binary, &args, &dir.join(format!("node{k}.err")));
            nodes.push(Node { child: Some(child), client_port: client_ports[k], monitor_port: monitor_ports[k], args });
        }
        let mut cluster = Self { nodes, dir };
        for k in 0..size {
            cluster.wait_accepting(k)?;
        }
        Ok(cluster)
    }

    /// Waits until node `k` accepts client connections; fails if it exits first or takes longer
    /// than [`START_TIMEOUT`].
    fn wait_accepting(&mut self, k: usize) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.nodes[k].client_port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = self.nodes[k].child.as_mut().and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!("node{k} exited while starting ({status}): {}", self.errors(k)));
            }
            if Instant::now() >= deadline {
                return Err(format!("node{k} did not start; log: {}{}", self.log(k), self.errors(k)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// What node `k` wrote to its standard error.
    fn errors(&self, k: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("node{k}.err"))).unwrap_or_default()
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
        self.nodes[k].child = Some(spawn(&binary, &self.nodes[k].args, &self.dir.join(format!("node{k}.err"))));
        if let Err(reason) = self.wait_accepting(k) {
            panic!("nats-server {reason}");
        }
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

fn spawn(binary: &Path, args: &[String], errors: &Path) -> Child {
    let errors = std::fs::File::create(errors).expect("a file for nats-server's standard error");
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errors)
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
