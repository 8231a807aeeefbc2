//! Play across machines: a host and a joiner on two "machines" of one LAN — two network
//! namespaces joined by a veth pair — each an ordinary Bevy app in its own process.
//!
//! In namespace A the host process runs a `HostedReflector` bound to `0.0.0.0`, makes the join
//! link from the addresses other devices reach it on (that must be the veth address, not
//! 127.0.0.1), prints it, and plays through 127.0.0.1. In namespace B the joiner process joins by
//! that link, so over the veth. Both publish events and print their state hash at the first
//! snapshot point after the last event; the hashes must be equal.
//!
//! The processes are this test binary run again (`ip netns exec <ns> <this exe> --exact
//! <role test> --ignored`) with `SYNQ_LAN_ROLE` naming the role. Needs root and iproute2: without
//! them the test fails, unless `SYNQ_SKIP_NETNS=1`.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_synq::SynqClient;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::protocol::link::JoinLink;
use bevy_synq::protocol::{AppId, SessionName};
use bevy_synq::reflector::server::{HostedReflector, UdpReflectorConfig};
use serde::{Deserialize, Serialize};

use common::process::{model_resource, synced, udp_app};

const APP_ID: &str = "io.bevy-synq.tests.lan";
/// Selects the role of a re-executed test binary.
const ROLE_VAR: &str = "SYNQ_LAN_ROLE";
/// Hands the join link to the joiner.
const LINK_VAR: &str = "SYNQ_LAN_LINK";
/// Events each side publishes.
const EVENTS_PER_SIDE: u64 = 10;
/// Events the model waits for before it marks the agreed point.
const EVENTS: u64 = 2 * EVENTS_PER_SIDE;
/// How long a role process may take in all.
const ROLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the test waits for any one thing from a child.
const WAIT: Duration = Duration::from_secs(90);

/// The marked lines the role processes print (everything else on their stdout is ignored).
const LINK_LINE: &str = "SYNQ_LAN_LINK ";
const REACHABLE_LINE: &str = "SYNQ_LAN_REACHABLE ";
const DIALLED_LINE: &str = "SYNQ_LAN_DIALLED ";
const HASH_LINE: &str = "SYNQ_LAN_HASH ";

// ---------------------------------------------------------------------------------------------
// The model: an order-dependent fold of every event, and the model time of the last one.

#[derive(Serialize, Deserialize, Clone)]
struct Add(u64);

#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
struct Tally {
    count: u64,
    fold: u64,
    /// Model time at which the last of the [`EVENTS`] events executed.
    done_at: Option<u64>,
}

fn model(model: &mut ModelApp) {
    model.init_resource::<Tally>().add_view_event::<Add>().add_observer(
        |add: On<FromView<Add>>, mut tally: ResMut<Tally>, time: Res<ModelTime>| {
            tally.count += 1;
            tally.fold = tally.fold.wrapping_mul(31).wrapping_add(add.0);
            if tally.count == EVENTS {
                tally.done_at = Some(time.now_ms());
            }
        },
    );
}

/// What this app's view still has to publish.
#[derive(Resource)]
struct ToPublish(std::ops::Range<u64>);

/// One event per frame, once synced.
fn publish(mut to_publish: ResMut<ToPublish>, mut add: Publish<Add>) {
    if let Some(value) = to_publish.0.next() {
        add.send(Add(value));
    }
}

fn session(name: &str, password: &str) -> SessionConfig {
    let mut session = SessionConfig::new(APP_ID, name, password);
    session.kdf = KdfParams::INSECURE_FAST;
    session.snapshot_policy.every_ms = 500;
    session
}

fn player(addr: SocketAddr, name: &str, password: &str, values: std::ops::Range<u64>) -> App {
    let mut app = udp_app(model, session(name, password), addr);
    app.insert_resource(ToPublish(values)).add_systems(Update, publish.run_if(is_synced));
    app
}

/// Plays until every event executed and a snapshot point after the last one passed; prints the
/// hash at that point (the agreed one: `done_at` is replicated model state).
fn play_to_agreed_point(app: &mut App, keep_going: impl Fn() -> bool) {
    let deadline = Instant::now() + ROLE_TIMEOUT;
    loop {
        app.update();
        let tally = model_resource::<Tally>(app);
        let client = app.world().resource::<SynqClient>();
        if let Some(Tally { done_at: Some(done_at), .. }) = tally
            && let Some(record) = client.hash_history().iter().find(|r| r.time > done_at)
        {
            let tally = tally.unwrap();
            let hash: String = record.hash.iter().map(|b| format!("{b:02x}")).collect();
            println!("{HASH_LINE}{} {} {hash} count={} fold={}", record.time, record.seq, tally.count, tally.fold);
            break;
        }
        assert!(
            Instant::now() < deadline && keep_going(),
            "no agreed snapshot point: synced {}, {tally:?}, {:?}",
            synced(app),
            app.world().resource::<SynqStatus>()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let problems = &app.world().resource::<common::Problems>().0;
    assert!(problems.is_empty(), "problems reported: {problems:?}");
}

// ---------------------------------------------------------------------------------------------
// The roles, run by `lan_host_and_joiner_agree` inside the namespaces.

#[test]
#[ignore = "a role of lan_host_and_joiner_agree, run by it inside a network namespace"]
fn lan_role_host() {
    if std::env::var(ROLE_VAR).as_deref() != Ok("host") {
        return;
    }
    let config = UdpReflectorConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() };
    let host = HostedReflector::start(config).expect("the reflector binds all interfaces");
    let reachable: Vec<String> = host.reachable_addresses().iter().map(ToString::to_string).collect();
    println!("{REACHABLE_LINE}{}", reachable.join(" "));
    let name = format!("lan-{}", std::process::id());
    let password = "correct horse";
    let link = JoinLink {
        host: host.link_addr().ip().to_string(),
        port: host.link_addr().port(),
        app_id: AppId::new(APP_ID).unwrap(),
        name: SessionName::new(&name).unwrap(),
        password: Some(password.into()),
    };
    println!("{LINK_LINE}{link}");

    // Until the test says "quit" (or goes away), keep playing so the joiner has a reflector.
    let quit = Arc::new(AtomicBool::new(false));
    let flag = quit.clone();
    std::thread::spawn(move || {
        let _ = std::io::stdin().lock().read_line(&mut String::new());
        flag.store(true, Ordering::Relaxed);
    });
    let mut app = player(host.local_client_addr(), &name, password, 1..1 + EVENTS_PER_SIDE);
    play_to_agreed_point(&mut app, || !quit.load(Ordering::Relaxed));
    let deadline = Instant::now() + ROLE_TIMEOUT;
    while !quit.load(Ordering::Relaxed) && Instant::now() < deadline {
        app.update();
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(app);
    host.stop();
}

#[test]
#[ignore = "a role of lan_host_and_joiner_agree, run by it inside a network namespace"]
fn lan_role_joiner() {
    if std::env::var(ROLE_VAR).as_deref() != Ok("joiner") {
        return;
    }
    let text = std::env::var(LINK_VAR).expect("the join link in SYNQ_LAN_LINK");
    let link = JoinLink::parse(&text).expect("the host's link parses");
    assert_eq!(link.app_id.as_str(), APP_ID);
    let addr = (link.host.as_str(), link.port).to_socket_addrs().expect("the link's host resolves").next().unwrap();
    println!("{DIALLED_LINE}{addr}");
    let password = link.password.clone().expect("the link carries the password");
    let mut app = player(addr, link.name.as_str(), &password, 101..101 + EVENTS_PER_SIDE);
    play_to_agreed_point(&mut app, || true);
}

// ---------------------------------------------------------------------------------------------
// The test.

/// A child process, killed when dropped; its stdout lines go to a channel (and to stderr, which
/// the test harness shows when the test fails).
struct RoleProcess {
    role: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RoleProcess {
    fn spawn(role: &'static str, ns: &str, env: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe().expect("the test executable");
        let mut command: Command = netns::Lan::command(ns, &exe);
        command
            .args(["--exact", &format!("lan_role_{role}"), "--ignored", "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, role)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start the {role}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{role}] {line}");
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self { role, child, stdin, lines, seen: Vec::new() }
    }

    /// What follows `mark` in the first line that has it, waiting at most [`WAIT`].
    fn marked(&mut self, mark: &str) -> String {
        // libtest may print "test <name> ... " on the same line, before the mark.
        let after = |line: &str| line.split_once(mark).map(|(_, rest)| rest.to_string());
        if let Some(rest) = self.seen.iter().find_map(|l| after(l)) {
            return rest;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = after(&line);
                    self.seen.push(line);
                    if let Some(rest) = found {
                        return rest;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the {} printed no {mark:?} within {WAIT:?}", self.role),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the {} ended ({:?}) without printing {mark:?}", self.role, self.child.try_wait())
                }
            }
        }
    }

    /// Waits for the process to end, at most [`WAIT`]; asserts it succeeded.
    fn wait_success(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "the {} failed: {status}", self.role);
                    return;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => panic!("the {} did not end within {WAIT:?}", self.role),
                Err(e) => panic!("waiting for the {}: {e}", self.role),
            }
        }
    }

    /// Tells a host to stop.
    fn quit(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[test]
fn lan_host_and_joiner_agree() {
    let Some(lan) = netns::Lan::create("lan") else { return };

    let mut host = RoleProcess::spawn("host", &lan.a, &[]);
    let reachable = host.marked(REACHABLE_LINE);
    let link_text = host.marked(LINK_LINE);
    let link = JoinLink::parse(&link_text).expect("the host printed a valid link");
    assert_eq!(
        link.host,
        lan.a_ip.to_string(),
        "the link must carry the host's LAN (veth) address; it reaches the host on: {reachable:?}"
    );
    assert_eq!(
        reachable,
        SocketAddr::new(IpAddr::V4(lan.a_ip), link.port).to_string(),
        "namespace A has one LAN address"
    );

    let mut joiner = RoleProcess::spawn("joiner", &lan.b, &[(LINK_VAR, &link_text)]);
    let dialled: SocketAddr = joiner.marked(DIALLED_LINE).parse().expect("an address");
    assert_eq!(dialled, SocketAddr::new(IpAddr::V4(lan.a_ip), link.port), "the joiner dials the veth address");
    let joiner_hash = joiner.marked(HASH_LINE);
    joiner.wait_success();
    let host_hash = host.marked(HASH_LINE);
    host.quit();
    host.wait_success();

    assert!(joiner_hash.contains(&format!("count={EVENTS} ")), "the joiner executed every event: {joiner_hash}");
    assert_eq!(host_hash, joiner_hash, "host and joiner disagree at the agreed snapshot point");
    drop((host, joiner));
    drop(lan);
}
