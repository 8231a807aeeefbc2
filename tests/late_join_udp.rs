//! A late joiner of a large model over real UDP (loopback, the `HostedReflector`): its `Sync`
//! carries a snapshot of a few MB — many renet flushes, many thousand datagrams — and events
//! since; it must restore it, catch up, and then agree with the running replicas on the state
//! hash at every snapshot point they share.

mod common;

use std::time::Duration;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::reflector::server::{HostedReflector, UdpReflectorConfig};
use bevy_synq::transport::udp::UdpConnector;
use bevy_synq::{StartKind, SynqClient};
use serde::{Deserialize, Serialize};

/// Entities in the model.
const ENTITIES: u32 = 20_000;
/// Bytes of opaque cargo per entity: with the rest, a snapshot of ≈ 3.5 MB.
const CARGO_BYTES: usize = 160;
/// Every wait gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(120);
/// A snapshot point after this many stamped messages (join notices, events or bundles of them).
const EVERY_EVENTS: u32 = 4;

#[derive(Component, Serialize, Deserialize, Clone, Copy)]
struct Position(f32, f32);

#[derive(Component, Serialize, Deserialize, Clone)]
struct Cargo(#[serde(with = "serde_bytes")] Vec<u8>);

/// An order-dependent digest of every nudge, and how many were executed.
#[derive(Resource, Serialize, Deserialize, Clone, Copy, Default, PartialEq, Debug)]
struct Ledger {
    nudges: u64,
    mix: u64,
}

#[derive(Serialize, Deserialize)]
struct Nudge(u32);

fn model(model: &mut ModelApp) {
    model
        .register_component::<Position>()
        .register_component::<Cargo>()
        .init_resource::<Ledger>()
        .add_view_event::<Nudge>()
        .add_systems(ModelInit, |mut commands: Commands, mut rng: ResMut<ModelRng>| {
            for i in 0..ENTITIES {
                let cargo = (0..CARGO_BYTES).map(|b| (i as usize * 31 + b) as u8).collect();
                commands.spawn((Position(rng.range_f32(0.0, 1000.0), rng.range_f32(0.0, 1000.0)), Cargo(cargo)));
            }
        })
        .add_observer(|nudge: On<FromView<Nudge>>, mut ledger: ResMut<Ledger>, mut positions: Query<&mut Position>| {
            // Moves every 97th entity, in query order: a replica that rebuilt its world in
            // another order would move other entities.
            for (i, mut position) in positions.iter_mut().enumerate() {
                if i % 97 == nudge.event.0 as usize % 97 {
                    position.0 += 1.0;
                }
            }
            ledger.nudges += 1;
            ledger.mix = ledger.mix.wrapping_mul(31).wrapping_add(u64::from(nudge.event.0) * 1000 + nudge.view.0);
        });
}

fn session(view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", "large-late-join", "correct horse");
    session.kdf = bevy_synq::protocol::crypto::KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    // Snapshot points after every few stamped messages only (each is costly for 20k entities in
    // a debug build): the test decides when they happen by publishing.
    session.snapshot_policy.every_ms = 3_600_000;
    session.snapshot_policy.every_events = EVERY_EVENTS;
    session
}

fn client_app(addr: std::net::SocketAddr, view: u64) -> App {
    let target = ReflectorTarget::custom(UdpConnector::new(addr, DEFAULT_PROTOCOL_ID));
    let mut app = App::new();
    app.add_plugins(MinimalPlugins).add_plugins(SynqPlugin::new(model, session(view)).with_reflector(target));
    app.finish();
    app.cleanup();
    app
}

fn ledger(app: &App) -> Option<Ledger> {
    let model = app.world().resource::<bevy_synq::ModelWorld>();
    model.runtime().map(|runtime| *runtime.world().resource::<Ledger>())
}

fn synced(app: &App) -> bool {
    app.world().resource::<SynqStatus>().is_synced()
}

/// Runs frames of every app until `done` holds, or fails after [`TIMEOUT`].
fn run_until(apps: &mut [App], what: &str, done: impl FnMut(&[App]) -> bool) {
    common::run_apps_until(apps, what, TIMEOUT, done);
}

fn publish(app: &mut App, values: std::ops::Range<u32>) {
    let mut state = bevy::ecs::system::SystemState::<Publish<Nudge>>::new(app.world_mut());
    let mut publish = state.get_mut(app.world_mut()).expect("Publish is always available");
    for value in values {
        publish.send(Nudge(value));
    }
    state.apply(app.world_mut());
}

fn history(app: &App) -> Vec<bevy_synq::HashRecord> {
    app.world().resource::<SynqClient>().hash_history().to_vec()
}

#[test]
fn a_late_joiner_of_a_large_model_over_udp_agrees_with_the_running_replicas() {
    let config = UdpReflectorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..UdpReflectorConfig::default() };
    let reflector = HostedReflector::start(config).expect("the reflector binds a loopback port");
    let addr = reflector.local_addr();
    let mut apps = vec![client_app(addr, 1), client_app(addr, 2)];
    run_until(&mut apps, "both replicas synced", |apps| apps.iter().all(synced));
    // Two more stamped messages (each frame's events go out as one): a snapshot point after them
    // is reached and stored (uploaded over UDP too) before the late joiner comes.
    let mut published = 0;
    for (app, values) in [(0, 0..20), (1, 100..120), (0, 20..30), (1, 120..130)] {
        publish(&mut apps[app], values.clone());
        published += values.len() as u64;
        run_until(&mut apps, "the events", |apps| {
            apps.iter().all(|app| ledger(app).is_some_and(|l| l.nudges == published))
        });
    }
    run_until(&mut apps, "a snapshot point after the first events", |apps| {
        apps.iter().all(|app| history(app).iter().any(|r| r.time > 0))
    });
    publish(&mut apps[0], 30..40);
    published += 10;

    apps.push(client_app(addr, 3));
    run_until(&mut apps, "the late joiner synced", |apps| synced(&apps[2]));
    let started = apps[2].world().resource::<SynqClient>().started_from();
    // The snapshot of that point is stored once its tally closed and the elected replica
    // uploaded it over UDP, which may still be under way: the joiner then starts from the first
    // snapshot (taken after the model's init, so it holds the whole model too) and replays more.
    assert!(
        matches!(started, Some(StartKind::Snapshot { .. })),
        "the late joiner must start from a stored snapshot of the large model: {started:?}"
    );
    publish(&mut apps[2], 200..210);
    publish(&mut apps[1], 130..140);
    published += 20;
    run_until(&mut apps, "every event on every replica", |apps| {
        apps.iter().all(|app| ledger(app).is_some_and(|l| l.nudges == published))
    });
    let ledgers: Vec<Ledger> = apps.iter().map(|app| ledger(app).unwrap()).collect();
    assert!(ledgers.windows(2).all(|w| w[0] == w[1]), "the replicas executed different histories: {ledgers:?}");

    // More stamped messages until every replica passed a snapshot point after the joiner synced;
    // they must agree at every point they share.
    let last = history(&apps[0]).last().map_or(0, |r| r.time);
    let mut value = 1000;
    while !apps.iter().all(|app| history(app).iter().filter(|r| r.time > last).count() >= 2) {
        assert!(value < 1100, "no snapshot points after 100 more events");
        publish(&mut apps[0], value..value + 1);
        value += 1;
        published += 1;
        run_until(&mut apps, "the extra event", |apps| {
            apps.iter().all(|app| ledger(app).is_some_and(|l| l.nudges == published))
        });
    }
    let joiner = history(&apps[2]);
    let mut shared = 0;
    for running in [history(&apps[0]), history(&apps[1])] {
        for record in &joiner {
            let other = running.iter().find(|r| r.time == record.time && r.seq == record.seq);
            if let Some(other) = other {
                assert_eq!(
                    record.hash, other.hash,
                    "the late joiner disagrees at {} ms / seq {}",
                    record.time, record.seq
                );
                shared += 1;
            }
        }
    }
    assert!(shared >= 2, "no shared snapshot point with each running replica: {joiner:?}");
    drop(apps);
    drop(reflector);
}
