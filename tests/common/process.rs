//! A real `synq-reflector` process on a loopback port, and Bevy apps that talk to it over UDP.

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{ModelWorld, SynqClient};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `synq-reflector` binary, brought up to date once per test binary (a no-op when
/// `cargo test --workspace` already built it).
pub fn reflector_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test> -> target/<profile>/synq-reflector
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe.parent().and_then(Path::parent).expect("target dir");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "synq_reflector", "--bin", "synq-reflector"]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("running cargo build for synq-reflector");
            assert!(status.success(), "building synq-reflector failed");
            dir.join(format!("synq-reflector{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// A fresh, empty data directory under the system's temp dir.
pub fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("synq-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a data dir");
    dir
}

/// A running `synq-reflector`. Killed when dropped.
pub struct ReflectorProcess {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl ReflectorProcess {
    /// Starts the reflector on a free loopback port (or `addr`, to restart on the same one).
    pub fn start(data_dir: &Path, addr: Option<SocketAddr>) -> Self {
        Self::start_with(data_dir, addr, &[])
    }

    /// Starts the reflector with extra command-line options.
    pub fn start_with(data_dir: &Path, addr: Option<SocketAddr>, options: &[&str]) -> Self {
        Self::spawn(addr, &[std::ffi::OsStr::new("--data-dir"), data_dir.as_os_str()], options, data_dir)
    }

    /// Starts a reflector of a cluster: its sessions in the NATS JetStream cluster at `urls`
    /// (comma-separated), with extra command-line options. It has no data directory.
    pub fn start_cluster(urls: &str, options: &[&str]) -> Self {
        Self::spawn(None, &[std::ffi::OsStr::new("--cluster"), std::ffi::OsStr::new(urls)], options, Path::new(""))
    }

    fn spawn(addr: Option<SocketAddr>, storage: &[&std::ffi::OsStr], options: &[&str], data_dir: &Path) -> Self {
        let listen = addr.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let mut child = Command::new(reflector_binary())
            .args(["--listen", &listen])
            .args(storage)
            .args(options)
            // Stray packets of clients from before a restart are expected in these tests.
            .env("RUST_LOG", "warn,renetcode=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting synq-reflector");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the reflector's address");
        let addr = line
            .trim()
            .strip_prefix("synq-reflector listening on udp://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .expect("an address");
        Self { child, addr, data_dir: data_dir.to_path_buf() }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB (Linux), from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReflectorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client app on a UDP reflector.
pub fn udp_app(model: impl ModelPlugin, session: SessionConfig, addr: SocketAddr) -> App {
    app_with(model, session, ReflectorTarget::Udp(addr))
}

/// A client app reaching its reflector through `target`.
pub fn app_with(model: impl ModelPlugin, session: SessionConfig, target: ReflectorTarget) -> App {
    let mut app = App::new();
    app.add_plugins(MinimalPlugins);
    app.add_plugins(SynqPlugin::new(model, session).with_reflector(target));
    app.init_resource::<super::Problems>().add_systems(Last, super::record_problems);
    app.finish();
    app.cleanup();
    app
}

/// Updates the apps (real time) until `done` holds; panics after `timeout`.
pub fn run_until(apps: &mut [&mut App], timeout: Duration, mut done: impl FnMut(&mut [&mut App]) -> bool) {
    let start = Instant::now();
    loop {
        for app in apps.iter_mut() {
            app.update();
        }
        if done(apps) {
            return;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Updates the apps for a while (real time).
pub fn run_for(apps: &mut [&mut App], duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        for app in apps.iter_mut() {
            app.update();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn synced(app: &App) -> bool {
    app.world().resource::<SynqClient>().is_synced()
}

pub fn model_resource<T: Resource + Clone>(app: &App) -> Option<T> {
    app.world().resource::<ModelWorld>().runtime()?.world().get_resource::<T>().cloned()
}
