//! Chaos soak: `kill -9` a real `synq-reflector` again and again under load, and check that no
//! event is lost or executed twice and that every replica ends up identical.
//!
//! ```sh
//! cargo run --release --example chaos -- --clients 4 --kills 10 --seconds 60 [--wipe-every 0] [--seed N] [--rate 10] [--cluster]
//! ```
//!
//! With `--cluster` it starts a three-node NATS JetStream cluster (`nats-server` must be
//! installed) and two `synq-reflector --cluster` edges instead; the clients list both edges, and
//! each kill hits the edge that serves the session at that moment: the clients move to the other
//! edge, which takes the session over once the killed edge's 1.5 s claim lapsed, and the killed
//! edge is restarted on its address once every client is synced again (so each recovery measured
//! is a failover to the other edge).
//!
//! It builds (if needed) and starts `synq-reflector` on a loopback port with a fresh data dir in
//! the system temp dir, then runs `--clients` headless Bevy apps in this process (view ids 1..=N,
//! one session, a 1 s snapshot policy). Each client publishes `Numbered(0)`, `Numbered(1)`, …
//! at `--rate` events per second, connected or not. The model records every event it executes in
//! a `Ledger`. `--kills` times, at seeded random moments, the reflector is killed (`SIGKILL`), the
//! clients run on without it for 0.2–3 s, and it is restarted on the same address and data dir;
//! with `--wipe-every K` every K-th restart gets an empty data dir (a reflector replaced without
//! its storage; the session must then be recovered from the replicas).
//!
//! After each kill it measures the recovery: the time until every client is synced again (with
//! `--cluster`, the failover), and prints its median and maximum at the end.
//!
//! At the end publishing stops, everything settles (all clients synced at the same model time),
//! and it prints per client: published, executed, lost, duplicated, reconnects, problems; whether
//! all replicas' ledgers and state hashes agree; and how often a client's model time went back.
//! Exit code 1 if anything was lost, duplicated, unexpected, disagreed or went back; 0 otherwise.

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::transport::udp::UdpConnector;
use bevy_synq::{ModelWorld, SynqClient};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../crates/synq_reflector/tests/common/nats.rs"]
mod nats;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize, Clone)]
struct Numbered(u32);

/// Every `Numbered` event in the order the model executed it: (view, n, model time), and a count.
#[derive(Resource, Serialize, Deserialize, Clone, Default, PartialEq)]
struct Ledger {
    entries: Vec<(u64, u32, u64)>,
    count: u64,
}

fn model(model: &mut ModelApp) {
    model.init_resource::<Ledger>().add_view_event::<Numbered>().add_observer(
        |event: On<FromView<Numbered>>, mut ledger: ResMut<Ledger>, time: Res<ModelTime>| {
            ledger.entries.push((event.view.0, event.0, time.now_ms()));
            ledger.count += 1;
        },
    );
}

/// The view side: publishes `Numbered(n)` at a steady rate while `start` is set.
#[derive(Resource, Default)]
struct Pace {
    per_second: u32,
    start: Option<Instant>,
    published: u32,
}

fn publish_numbered(mut pace: ResMut<Pace>, mut publish: Publish<Numbered>) {
    let Some(start) = pace.start else { return };
    let due = (start.elapsed().as_secs_f64() * f64::from(pace.per_second)) as u32;
    while pace.published < due {
        publish.send(Numbered(pace.published));
        pace.published += 1;
    }
}

#[derive(Resource, Default)]
struct Problems(Vec<String>);

fn record_problems(
    mut problems: MessageReader<SynqProblem>,
    mut divergences: MessageReader<DivergenceDetected>,
    mut all: ResMut<Problems>,
) {
    all.0.extend(problems.read().map(|p| format!("{p:?}")));
    all.0.extend(divergences.read().map(|d| format!("{d:?}")));
}

/// A client of the session on the reflectors at `edges`, tried in order.
fn client_app(view: u64, edges: &[SocketAddr], rate: u32) -> App {
    let mut session = SessionConfig::new("io.bevy-synq.chaos", "chaos", "chaos password");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 1_000;
    let mut app = App::new();
    app.add_plugins(MinimalPlugins);
    let connector = UdpConnector::new(edges[0], DEFAULT_PROTOCOL_ID)
        .with_fallbacks(edges.iter().copied())
        .with_connect_timeout(Duration::from_millis(500));
    app.add_plugins(SynqPlugin::new(model, session).with_reflector(ReflectorTarget::custom(connector)));
    app.insert_resource(Pace { per_second: rate, ..default() }).init_resource::<Problems>();
    app.add_systems(Update, publish_numbered).add_systems(Last, record_problems);
    app.finish();
    app.cleanup();
    app
}

fn client(app: &App) -> &SynqClient {
    app.world().resource::<SynqClient>()
}

fn model_time(app: &App) -> Option<u64> {
    app.world().resource::<ModelWorld>().runtime().map(|r| r.now_ms())
}

fn ledger(app: &App) -> Ledger {
    let runtime = app.world().resource::<ModelWorld>().runtime();
    runtime.and_then(|r| r.world().get_resource::<Ledger>().cloned()).unwrap_or_default()
}

/// `target/<profile>/synq-reflector`, rebuilt with cargo when missing or older than this example.
fn reflector_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    // target/<profile>/examples/chaos -> target/<profile>
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile> dir");
    let bin = dir.join(format!("synq-reflector{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin).is_none() || modified(&bin) < modified(&exe) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "synq_reflector", "--bin", "synq-reflector"]);
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => drop(build.arg("--release")),
            Some(profile) => drop(build.args(["--profile", profile])),
        }
        eprintln!("chaos: building synq-reflector: {build:?}");
        assert!(build.status().is_ok_and(|s| s.success()), "building synq-reflector failed");
    }
    bin
}

/// Where a reflector keeps its sessions.
enum Store<'a> {
    Dir(&'a Path),
    /// A NATS JetStream cluster (its URLs, comma-separated).
    Cluster(&'a str),
}

/// A running `synq-reflector`; killed (SIGKILL) when dropped.
struct Reflector(Child);

impl Reflector {
    fn start(bin: &Path, store: &Store, listen: &str) -> (Self, SocketAddr) {
        let mut command = Command::new(bin);
        command.args(["--listen", listen]);
        match store {
            Store::Dir(dir) => drop(command.arg("--data-dir").arg(dir)),
            Store::Cluster(urls) => drop(command.args(["--cluster", urls, "--claim-ttl-ms", "1500"])),
        }
        let mut child = command
            .env("RUST_LOG", std::env::var("CHAOS_REFLECTOR_LOG").unwrap_or_else(|_| "warn,renetcode=off".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting synq-reflector");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading the reflector's address");
        // Keep draining its stdout so that it never writes into a closed pipe.
        std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(drop));
        let addr = line
            .trim()
            .strip_prefix("synq-reflector listening on udp://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from synq-reflector: {line:?}"));
        (Self(child), addr)
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the data dir when dropped (also on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn reset(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
        std::fs::create_dir_all(&self.0).expect("creating the data dir");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SplitMix64: a small seeded RNG, enough to place kills.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Options {
    cluster: bool,
    clients: u64,
    kills: u32,
    seconds: f64,
    wipe_every: u32,
    seed: u64,
    rate: u32,
}

fn options() -> Options {
    let clock_seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut o =
        Options { cluster: false, clients: 4, kills: 10, seconds: 60.0, wipe_every: 0, seed: clock_seed, rate: 10 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--cluster" {
            o.cluster = true;
            continue;
        }
        let value = args.next().unwrap_or_default();
        let bad = || -> ! {
            eprintln!(
                "usage: chaos [--clients N] [--kills M] [--seconds S] [--wipe-every K] [--seed N] [--rate R] [--cluster]"
            );
            eprintln!("bad argument: {flag} {value}");
            std::process::exit(2)
        };
        match flag.as_str() {
            "--clients" => o.clients = value.parse().unwrap_or_else(|_| bad()),
            "--kills" => o.kills = value.parse().unwrap_or_else(|_| bad()),
            "--seconds" => o.seconds = value.parse().unwrap_or_else(|_| bad()),
            "--wipe-every" => o.wipe_every = value.parse().unwrap_or_else(|_| bad()),
            "--seed" => o.seed = value.parse().unwrap_or_else(|_| bad()),
            "--rate" => o.rate = value.parse().unwrap_or_else(|_| bad()),
            _ => bad(),
        }
    }
    if o.clients == 0 || o.clients > 64 || o.seconds < 2.0 || o.seconds > 3600.0 || o.rate == 0 || o.rate > 1000 {
        eprintln!("chaos: need 1..=64 clients, 2..=3600 seconds, a rate of 1..=1000");
        std::process::exit(2);
    }
    if o.cluster && o.wipe_every > 0 {
        eprintln!("chaos: --wipe-every has no meaning with --cluster (the edges keep nothing locally)");
        std::process::exit(2);
    }
    o
}

/// Updates every app once, samples model times and counts decreases.
fn step(apps: &mut [App], last_time: &mut [u64], went_back: &mut [u32]) {
    for (i, app) in apps.iter_mut().enumerate() {
        app.update();
        if let Some(now) = model_time(app) {
            if now < last_time[i] {
                went_back[i] += 1;
                println!("chaos: client {} model time went back {} -> {now} ms", i + 1, last_time[i]);
            }
            last_time[i] = now;
        }
    }
    std::thread::sleep(Duration::from_millis(3));
}

fn main() {
    let o = options();
    let bin = reflector_binary();
    let dir = TempDir(std::env::temp_dir().join(format!("synq-chaos-{}", std::process::id())));
    dir.reset();
    let nats = o.cluster.then(|| {
        nats::nats_available("chaos --cluster");
        nats::NatsCluster::start("chaos", 3)
    });
    let urls = nats.as_ref().map(nats::NatsCluster::url_list);
    let store = match &urls {
        Some(urls) => Store::Cluster(urls),
        None => Store::Dir(&dir.0),
    };
    // One reflector, or two edges of a cluster.
    let (mut reflectors, mut addrs) = (Vec::new(), Vec::new());
    for _ in 0..if o.cluster { 2 } else { 1 } {
        let (reflector, addr) = Reflector::start(&bin, &store, "127.0.0.1:0");
        reflectors.push(Some(reflector));
        addrs.push(addr);
    }
    match &urls {
        Some(urls) => println!("chaos: edges on {addrs:?}, NATS cluster {urls}, seed {}", o.seed),
        None => println!("chaos: reflector on udp://{}, data dir {}, seed {}", addrs[0], dir.0.display(), o.seed),
    }

    let n = o.clients as usize;
    let mut apps: Vec<App> = (1..=o.clients).map(|view| client_app(view, &addrs, o.rate)).collect();
    let (mut last_time, mut went_back) = (vec![0u64; n], vec![0u32; n]);
    let start = Instant::now();
    while !apps.iter().all(|app| client(app).is_synced()) {
        if start.elapsed() > FIRST_SYNC_TIMEOUT {
            println!("chaos: the clients did not sync within {FIRST_SYNC_TIMEOUT:?}");
            drop((apps, reflectors, nats, dir));
            std::process::exit(1);
        }
        step(&mut apps, &mut last_time, &mut went_back);
    }

    // One kill per equal slot of [1 s, seconds - 1 s], at a random moment, down for 0.2–3 s.
    let mut rng = Rng(o.seed);
    let slot = (o.seconds - 2.0) / f64::from(o.kills.max(1));
    let plan: Vec<(f64, f64)> = (0..o.kills)
        .map(|k| {
            let down = (0.2 + 2.8 * rng.unit()).min(slot * 0.6);
            (1.0 + slot * f64::from(k) + (slot - down) * rng.unit(), down)
        })
        .collect();
    let (mut next_kill, mut restarts, mut wipes, mut up_at) = (0usize, 0u32, 0u32, None::<Instant>);
    // The reflector (edge) that is down, and since when every client is to be synced again.
    let mut down_edge = 0;
    let mut recovering: Option<(Instant, Vec<u32>)> = None;
    // With --cluster, the killed edge waits for the failover before it restarts.
    let mut restart_after_recovery = false;
    let (mut recoveries, mut unrecovered) = (Vec::<Duration>::new(), 0u32);

    let chaos = Instant::now();
    for app in &mut apps {
        app.world_mut().resource_mut::<Pace>().start = Some(chaos);
    }
    while chaos.elapsed().as_secs_f64() < o.seconds {
        let t = chaos.elapsed().as_secs_f64();
        if up_at.is_some_and(|at| Instant::now() >= at) {
            restarts += 1;
            let wipe = o.wipe_every > 0 && restarts.is_multiple_of(o.wipe_every);
            if wipe {
                dir.reset();
                wipes += 1;
            }
            reflectors[down_edge] = Some(Reflector::start(&bin, &store, &addrs[down_edge].to_string()).0);
            up_at = None;
            println!("chaos: {t:6.2}s restart #{restarts}{}", if wipe { " with an EMPTY data dir" } else { "" });
        } else if up_at.is_none() && !restart_after_recovery && next_kill < plan.len() && t >= plan[next_kill].0 {
            let down = plan[next_kill].1;
            // The reflector that serves the session now.
            let serving = apps[0].world().resource::<SynqConnection>().reflector.clone().unwrap_or_default();
            down_edge = addrs.iter().position(|a| serving.contains(&a.to_string())).unwrap_or(0);
            drop(reflectors[down_edge].take()); // SIGKILL
            next_kill += 1;
            if o.cluster {
                restart_after_recovery = true;
            } else {
                up_at = Some(Instant::now() + Duration::from_secs_f64(down));
            }
            if recovering.is_some() {
                unrecovered += 1;
            }
            recovering = Some((Instant::now(), apps.iter().map(|app| client(app).reconnects()).collect()));
            match o.cluster {
                true => println!("chaos: {t:6.2}s kill #{next_kill} of udp://{}", addrs[down_edge]),
                false => println!("chaos: {t:6.2}s kill #{next_kill}, down for {:.0} ms", down * 1000.0),
            }
        }
        step(&mut apps, &mut last_time, &mut went_back);
        if let Some((killed, before)) = &recovering
            && apps.iter().zip(before).all(|(app, &b)| client(app).reconnects() > b && client(app).is_synced())
        {
            recoveries.push(killed.elapsed());
            println!("chaos: {:6.2}s every client synced again {:?} after the kill", t, killed.elapsed());
            recovering = None;
            if restart_after_recovery {
                reflectors[down_edge] = Some(Reflector::start(&bin, &store, &addrs[down_edge].to_string()).0);
                restart_after_recovery = false;
                restarts += 1;
                println!("chaos: {t:6.2}s restart #{restarts} of udp://{}", addrs[down_edge]);
            }
        }
    }
    for app in &mut apps {
        app.world_mut().resource_mut::<Pace>().start = None;
    }
    if reflectors[down_edge].is_none() {
        reflectors[down_edge] = Some(Reflector::start(&bin, &store, &addrs[down_edge].to_string()).0);
        println!("chaos: restart after the run");
    }
    let published: Vec<u32> = apps.iter().map(|app| app.world().resource::<Pace>().published).collect();
    let total_published: u64 = published.iter().map(|&p| u64::from(p)).sum();

    // Settle: all synced at the same model time, and either everything executed or nothing new
    // executed for 3 s.
    let settle = Instant::now();
    let (mut last_count, mut stable_since) = (u64::MAX, Instant::now());
    let settled = loop {
        step(&mut apps, &mut last_time, &mut went_back);
        let times: Vec<Option<u64>> = apps.iter().map(model_time).collect();
        let ready = apps.iter().all(|app| client(app).is_synced()) && times.windows(2).all(|w| w[0] == w[1]);
        let count = ledger(&apps[0]).count;
        if count != last_count {
            (last_count, stable_since) = (count, Instant::now());
        }
        if ready && (count >= total_published || stable_since.elapsed() > Duration::from_secs(3)) {
            break true;
        }
        if settle.elapsed() > SETTLE_TIMEOUT {
            println!(
                "chaos: did not settle within {SETTLE_TIMEOUT:?}: statuses {:?}, model times {times:?}",
                apps.iter().map(|app| client(app).status().clone()).collect::<Vec<_>>()
            );
            break false;
        }
    };

    // Check.
    let ledgers: Vec<Ledger> = apps.iter().map(ledger).collect();
    let hashes: Vec<Option<[u8; 32]>> = apps
        .iter_mut()
        .map(|app| app.world_mut().resource_mut::<ModelWorld>().state_hash().and_then(Result::ok))
        .collect();
    let agree = settled
        && ledgers.windows(2).all(|w| w[0] == w[1])
        && hashes.windows(2).all(|w| w[0] == w[1])
        && hashes[0].is_some();
    let mut seen: BTreeMap<(u64, u32), u32> = BTreeMap::new();
    for &(view, number, _) in &ledgers[0].entries {
        *seen.entry((view, number)).or_default() += 1;
    }
    let (mut executed, mut lost, mut duplicated) = (0u64, 0u64, 0u64);
    println!("client  published  executed  lost  duplicated  reconnects  time-back  problems");
    for (i, app) in apps.iter().enumerate() {
        let view = i as u64 + 1;
        let present = |k: u32| seen.get(&(view, k)).copied().unwrap_or(0);
        let done = (0..published[i]).filter(|&k| present(k) > 0).count() as u64;
        let missing: Vec<u32> = (0..published[i]).filter(|&k| present(k) == 0).collect();
        let twice: u64 = (0..published[i]).map(|k| u64::from(present(k).saturating_sub(1))).sum();
        let problems = &app.world().resource::<Problems>().0;
        println!(
            "{view:>6}  {:>9}  {done:>8}  {:>4}  {twice:>10}  {:>10}  {:>9}  {:>8}",
            published[i],
            missing.len(),
            client(app).reconnects(),
            went_back[i],
            problems.len()
        );
        if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
            println!("        lost n in {first}..={last} ({} numbers)", missing.len());
        }
        for problem in problems.iter().take(5) {
            println!("        problem: {problem}");
        }
        (executed, lost, duplicated) = (executed + done, lost + missing.len() as u64, duplicated + twice);
    }
    let unexpected = seen
        .iter()
        .filter(|((view, k), _)| *view == 0 || *view > o.clients || *k >= published[*view as usize - 1])
        .count();
    if unexpected > 0 {
        println!("chaos: {unexpected} executed events were never published");
    }
    if !agree {
        let short = |h: &Option<[u8; 32]>| {
            h.map_or("none".into(), |h| h[..4].iter().map(|b| format!("{b:02x}")).collect::<String>())
        };
        println!(
            "chaos: ledger lengths {:?}, hashes {:?}",
            ledgers.iter().map(|l| l.entries.len()).collect::<Vec<_>>(),
            hashes.iter().map(short).collect::<Vec<_>>()
        );
    }
    let back: u32 = went_back.iter().sum();
    recoveries.sort();
    if let (Some(median), Some(max)) = (recoveries.get(recoveries.len() / 2), recoveries.last()) {
        let p99 = recoveries[(recoveries.len() * 99).div_ceil(100) - 1];
        println!(
            "chaos: recovery after a kill (every client synced again): median {median:?}, p99 {p99:?}, max {max:?} over {} kills{}",
            recoveries.len(),
            if unrecovered > 0 { format!(" ({unrecovered} killed again before recovering)") } else { String::new() }
        );
    }
    println!(
        "chaos: kills {} (wipes {wipes}), published {total_published}, executed {executed}, lost {lost}, duplicated {duplicated}, replicas agree: {}, time went back: {back}",
        next_kill,
        if agree { "yes" } else { "no" }
    );
    drop(apps);
    drop(reflectors);
    drop(nats);
    drop(dir);
    let ok = lost == 0 && duplicated == 0 && unexpected == 0 && agree && back == 0;
    std::process::exit(if ok { 0 } else { 1 });
}
