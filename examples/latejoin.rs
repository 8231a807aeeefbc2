//! Late-join benchmark: wall time from "join requested" (the joiner's app is built, and
//! `SynqPlugin::new` joins at build) to [`SynqStatus::Synced`], for a late joiner of a session
//! whose model holds `--entities` entities (3 small components each) with `--events` view events
//! stamped since the reflector's latest snapshot, over real UDP on 127.0.0.1 (an in-process
//! [`HostedReflector`]), with the recommended Argon2id key derivation ([`KdfParams::RECOMMENDED`]).
//!
//! A seeder starts the session (its model's init spawns the entities) and publishes events, each
//! its own stamped message (at the client's send rate, 50 a second), until a snapshot point
//! (every 1,000 stamped events), which the reflector then stores; then `--events` more (seeding
//! takes ≈ 40 s a run). Then a joiner's app is built and updated in a tight loop (no frame
//! pacing) until it is synced; it replays those events and its own view-join. Each run does all
//! this in a fresh session, so that every joiner finds the same quiet state. The median, minimum
//! and maximum of `--runs` runs are printed as one Markdown table row (stderr shows each run, and
//! when the joiner's status changed); key derivation alone is measured too, as the floor of what
//! a join can cost.
//!
//! ```text
//! cargo run --release --example latejoin -- --entities 10000
//! cargo run --release --example latejoin -- --entities 100000 --runs 5
//! cargo run --release --example latejoin -- --header   # the table's header
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::{KdfParams, SessionKey};
use bevy_synq::protocol::ids::PersistentId;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::transport::udp::UdpConnector;
use bevy_synq::{ModelWorld, SnapshotPolicy, StartKind, SynqClient};
use serde::{Deserialize, Serialize};
use synq_reflector::ReflectorConfig;
use synq_reflector::server::{HostedReflector, UdpReflectorConfig};

/// A snapshot point after this many stamped events: the seeder reaches it, then publishes the
/// events the joiner replays (fewer, so that no other point follows).
const SNAPSHOT_EVERY_EVENTS: u32 = 1_000;
/// Every wait gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Position(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Velocity(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Kind(u32);

#[derive(Resource, Serialize, Deserialize, Clone, Copy)]
struct Population(u32);

/// View events executed so far.
#[derive(Resource, Serialize, Deserialize, Clone, Copy, Default)]
struct Nudges(u64);

/// A view event: moves the entities of one kind a little.
#[derive(Serialize, Deserialize)]
struct Nudge(u32);

fn model(model: &mut ModelApp) {
    model
        .register_component::<Position>()
        .register_component::<Velocity>()
        .register_component::<Kind>()
        .register_resource::<Population>()
        .init_resource::<Nudges>()
        .add_view_event::<Nudge>()
        .add_systems(ModelInit, |mut commands: Commands, population: Res<Population>, mut rng: ResMut<ModelRng>| {
            for i in 0..population.0 {
                commands.spawn((
                    Position(rng.range_f32(0.0, 1000.0), rng.range_f32(0.0, 1000.0)),
                    Velocity(rng.range_f32(-3.0, 3.0), rng.range_f32(-3.0, 3.0)),
                    Kind(i % 7),
                ));
            }
        })
        // Cheap on purpose: the benchmark measures the join, not the model's work.
        .add_observer(|_: On<FromView<Nudge>>, mut nudges: ResMut<Nudges>| nudges.0 += 1);
}

fn plugin(n: u32) -> impl Fn(&mut ModelApp) + Send + Sync + Clone + 'static {
    move |app: &mut ModelApp| {
        model(app);
        app.world_mut().insert_resource(Population(n));
    }
}

fn session(name: &str, view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.latejoin", name, "correct horse battery staple");
    session.kdf = KdfParams::RECOMMENDED;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy = SnapshotPolicy { every_ms: u64::MAX / 4, every_events: SNAPSHOT_EVERY_EVENTS };
    // The seeder publishes one event a frame, each its own sealed message (not bundled).
    session.event_rate_limit = 100_000;
    session
}

fn app(addr: SocketAddr, n: u32, name: &str, view: u64) -> App {
    let target = ReflectorTarget::custom(UdpConnector::new(addr, DEFAULT_PROTOCOL_ID));
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(SynqPlugin::new(plugin(n), session(name, view)).with_reflector(target));
    app.finish();
    app.cleanup();
    app
}

fn nudges(app: &App) -> u64 {
    app.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.world().resource::<Nudges>().0)
}

fn synced(app: &App) -> bool {
    app.world().resource::<SynqStatus>().is_synced()
}

/// Updates `app` until `done` holds.
fn run_until(app: &mut App, what: &str, mut done: impl FnMut(&App) -> bool) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    while !done(app) {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}: {:?}", app.world().resource::<SynqStatus>()));
        }
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Publishes `count` events, one per frame: events published in one frame go out bundled in one
/// sealed message, and the benchmark wants `count` stamped events.
fn publish(app: &mut App, count: u32) {
    let mut state = bevy::ecs::system::SystemState::<Publish<Nudge>>::new(app.world_mut());
    for i in 0..count {
        let mut publish = state.get_mut(app.world_mut()).expect("Publish is always available");
        publish.send(Nudge(i));
        state.apply(app.world_mut());
        app.update();
    }
}

/// A session with a stored snapshot and `events` stamped events since: the seeder's app, and
/// the snapshot point the joiner must start from (model time, seq).
fn seed(addr: SocketAddr, n: u32, events: u32, name: &str) -> Result<(App, (u64, u32)), String> {
    let mut seeder = app(addr, n, name, 1);
    run_until(&mut seeder, "the seeder to sync", synced)?;
    // Its own view-join is the first stamped event: this many more reach the snapshot point.
    // Each event is its own sealed message, sent at the client's send rate (50 a second).
    let to_point = SNAPSHOT_EVERY_EVENTS - 1;
    publish(&mut seeder, to_point);
    run_until(&mut seeder, "the snapshot point", |app| {
        nudges(app) == u64::from(to_point)
            && app.world().resource::<SynqClient>().hash_history().iter().any(|r| r.time > 0)
    })?;
    let point = {
        let history = seeder.world().resource::<SynqClient>().hash_history();
        let record = history.iter().rfind(|r| r.time > 0).expect("checked above");
        (record.time, record.seq)
    };
    publish(&mut seeder, events);
    run_until(&mut seeder, "the events after the snapshot", |app| nudges(app) == u64::from(to_point + events))?;
    Ok((seeder, point))
}

/// One measured late join of the seeded session, as `view`: the time to `Synced`, and the
/// number of stamped events since the snapshot the joiner executed.
fn join_once(addr: SocketAddr, n: u32, name: &str, view: u64, point: (u64, u32)) -> Result<(Duration, u32), String> {
    let started = Instant::now();
    let mut joiner = app(addr, n, name, view);
    // When each status was first seen (stderr): where the time goes.
    let mut seen: Vec<(String, Duration)> = Vec::new();
    while !synced(&joiner) {
        if started.elapsed() > TIMEOUT {
            return Err(format!("the joiner did not sync: {:?}", joiner.world().resource::<SynqStatus>()));
        }
        joiner.update();
        let status = format!("{:?}", joiner.world().resource::<SynqStatus>());
        let status = status.split(' ').next().unwrap_or_default().to_string();
        if seen.last().is_none_or(|(last, _)| *last != status) {
            seen.push((status, started.elapsed()));
        }
    }
    let join = started.elapsed();
    let phases: Vec<String> = seen.iter().map(|(status, at)| format!("{status} at {} ms", ms(*at))).collect();
    eprintln!("  {}", phases.join(", "));
    let client = joiner.world().resource::<SynqClient>();
    if client.started_from() != Some(StartKind::Snapshot { time: point.0 }) {
        return Err(format!("the joiner started from {:?}, not the snapshot at {} ms", client.started_from(), point.0));
    }
    let last_seq = joiner.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.last_seq());
    Ok((join, last_seq.wrapping_sub(point.1)))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut entities = 10_000u32;
    let mut events = 900u32;
    let mut runs = 7usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match arg.as_str() {
            "--entities" => entities = value("--entities") as u32,
            "--events" => events = value("--events") as u32,
            "--runs" => runs = value("--runs").max(1),
            "--header" => {
                println!(
                    "| entities | events since snapshot | snapshot | Argon2id alone | join → Synced, median | min | max | runs |"
                );
                println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
                return;
            }
            other => {
                eprintln!("unknown argument {other}; use --entities N, --events N, --runs N or --header");
                std::process::exit(2);
            }
        }
    }
    if events + 2 >= SNAPSHOT_EVERY_EVENTS {
        eprintln!("--events must stay below {} (the snapshot policy)", SNAPSHOT_EVERY_EVENTS - 2);
        std::process::exit(2);
    }

    let kdf: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let persistent_id = PersistentId::parse(&"A".repeat(43)).expect("a persistent id");
            let key = SessionKey::derive("correct horse battery staple", &persistent_id, KdfParams::RECOMMENDED);
            std::hint::black_box(key.is_ok());
            started.elapsed()
        })
        .collect();

    let reflector_config = ReflectorConfig { max_events_per_second: 100_000, ..ReflectorConfig::default() };
    let config = UdpReflectorConfig {
        listen: "127.0.0.1:0".parse().expect("an address"),
        reflector: reflector_config,
        ..UdpReflectorConfig::default()
    };
    let reflector = HostedReflector::start(config).expect("the reflector binds a loopback port");
    let addr = reflector.local_addr();

    let mut joins = Vec::new();
    let mut events_since = 0;
    for run in 0..runs {
        // A fresh session for each run: every joiner finds the same session (snapshot, events, one
        // member) in the same quiet state.
        let name = format!("latejoin-{entities}-{events}-{}-{run}", std::process::id());
        let (seeder, point) = seed(addr, entities, events, &name).unwrap_or_else(|error| {
            eprintln!("seeding failed: {error}");
            std::process::exit(1);
        });
        match join_once(addr, entities, &name, 2, point) {
            Ok((join, since)) => {
                eprintln!("run {run}: {} ms ({since} events since the snapshot)", ms(join));
                joins.push(join);
                events_since = since;
            }
            Err(error) => {
                eprintln!("run {run} failed: {error}");
                std::process::exit(1);
            }
        }
        drop(seeder);
    }
    let snapshot = snapshot_size(entities);
    let (min, max) = (joins.iter().min().copied().unwrap_or_default(), joins.iter().max().copied().unwrap_or_default());
    println!(
        "| {entities} | {events_since} | {snapshot} | {} ms | **{} ms** | {} ms | {} ms | {runs} |",
        ms(median(kdf)),
        ms(median(joins)),
        ms(min),
        ms(max)
    );
    reflector.stop();
}

/// The size of a snapshot of `n` entities (sealing adds a few dozen bytes; the `Sync` is this
/// plus the events).
fn snapshot_size(n: u32) -> String {
    let mut runtime = bevy_synq::ModelRuntime::start_fresh(plugin(n), bevy_synq::RuntimeOptions::default());
    let bytes = runtime.capture().map(|b| b.len()).unwrap_or(0);
    format!("{:.2} MB", bytes as f64 / 1e6)
}
