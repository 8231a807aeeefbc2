//! Two Bevy apps in one session through a reflector on real UDP sockets (loopback): the
//! `synq_reflector::server::HostedReflector` (a `UdpReflector` on a thread), and each app's `UdpConnector`. Both views
//! publish events at the same time; the replicas must execute them in the same order and agree on
//! their state hashes at every snapshot point they share.

mod common;

use std::time::Duration;

use bevy::prelude::*;
use bevy_synq::SynqClient;
use bevy_synq::prelude::*;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::reflector::server::{HostedReflector, UdpReflectorConfig};
use bevy_synq::transport::udp::UdpConnector;
use serde::{Deserialize, Serialize};

/// How many events each view publishes.
const EVENTS_PER_VIEW: u64 = 20;
/// Every wait gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Serialize, Deserialize)]
struct Bump(u64);

/// Order-dependent model state: every event in the order the model executed it.
#[derive(Resource, Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
struct Ledger {
    /// (sender view, value, model time)
    entries: Vec<(u64, u64, u64)>,
    joined: Vec<u64>,
    /// A running value that depends on the order of the entries.
    mix: u64,
}

fn model(model: &mut ModelApp) {
    model
        .init_resource::<Ledger>()
        .add_view_event::<Bump>()
        .add_observer(|joined: On<ViewJoined>, mut ledger: ResMut<Ledger>| ledger.joined.push(joined.view.0))
        .add_observer(|bump: On<FromView<Bump>>, mut ledger: ResMut<Ledger>, time: Res<ModelTime>| {
            let entry = (bump.view.0, bump.event.0, time.now_ms());
            ledger.mix = ledger.mix.wrapping_mul(31).wrapping_add(entry.0 * 1000 + entry.1);
            ledger.entries.push(entry);
        });
}

/// A session config for tests: cheap key derivation, a snapshot point every 500 ms.
fn test_session(view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", "udp", "correct horse");
    session.kdf = bevy_synq::protocol::crypto::KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 500;
    session
}

/// Every problem a replica reported.
#[derive(Resource, Default)]
struct Problems(Vec<SynqProblem>);

/// What this app's view still has to publish.
#[derive(Resource)]
struct ToPublish(std::ops::Range<u64>);

/// Publishes one event per frame (once synced).
fn publish(mut to_publish: ResMut<ToPublish>, mut bump: Publish<Bump>) {
    if let Some(value) = to_publish.0.next() {
        bump.send(Bump(value));
    }
}

fn start_reflector() -> (HostedReflector, std::net::SocketAddr) {
    let config = UdpReflectorConfig { listen: "127.0.0.1:0".parse().unwrap(), ..UdpReflectorConfig::default() };
    let reflector = HostedReflector::start(config).expect("the reflector binds a loopback port");
    let addr = reflector.local_addr();
    (reflector, addr)
}

fn client_app(addr: std::net::SocketAddr, view: u64, values: std::ops::Range<u64>) -> App {
    let session = test_session(view);
    let target = ReflectorTarget::custom(UdpConnector::new(addr, DEFAULT_PROTOCOL_ID));
    let mut app = App::new();
    app.add_plugins(MinimalPlugins)
        .add_plugins(SynqPlugin::new(model, session).with_reflector(target))
        .insert_resource(ToPublish(values))
        .init_resource::<Problems>()
        .add_systems(Update, publish.run_if(is_synced))
        .add_systems(Last, |mut reader: MessageReader<SynqProblem>, mut all: ResMut<Problems>| {
            all.0.extend(reader.read().cloned())
        });
    app.finish();
    app.cleanup();
    app
}

fn ledger(app: &App) -> Option<Ledger> {
    let model = app.world().resource::<bevy_synq::ModelWorld>();
    model.runtime().map(|runtime| runtime.world().resource::<Ledger>().clone())
}

/// Runs frames of every app until `done` holds, or fails after [`TIMEOUT`].
fn run_until(apps: &mut [App], what: &str, done: impl FnMut(&[App]) -> bool) {
    common::run_apps_until(apps, what, TIMEOUT, done);
}

#[test]
fn two_apps_over_udp_agree() {
    let (reflector, addr) = start_reflector();
    let mut apps = vec![client_app(addr, 1, 0..EVENTS_PER_VIEW), client_app(addr, 2, 100..100 + EVENTS_PER_VIEW)];

    // Everything both views published is executed by both replicas.
    let total = 2 * EVENTS_PER_VIEW as usize;
    run_until(&mut apps, "every event on both replicas", |apps| {
        apps.iter().all(|app| ledger(app).is_some_and(|l| l.entries.len() == total))
    });
    let ledgers: Vec<Ledger> = apps.iter().map(|app| ledger(app).unwrap()).collect();
    assert_eq!(ledgers[0], ledgers[1], "the replicas executed different histories");
    let last_event = ledgers[0].entries.iter().map(|e| e.2).max().unwrap();
    for view in [1, 2] {
        let values: Vec<u64> = ledgers[0].entries.iter().filter(|e| e.0 == view).map(|e| e.1).collect();
        let expected: Vec<u64> =
            if view == 1 { (0..EVENTS_PER_VIEW).collect() } else { (100..100 + EVENTS_PER_VIEW).collect() };
        assert_eq!(values, expected, "view {view}'s events, in the order it published them");
    }

    // Both pass a snapshot point after the last event; they agree at every point they share.
    run_until(&mut apps, "a shared snapshot point after the last event", |apps| {
        apps.iter().all(|app| app.world().resource::<SynqClient>().hash_history().iter().any(|r| r.time > last_event))
    });
    let histories: Vec<_> =
        apps.iter().map(|app| app.world().resource::<SynqClient>().hash_history().to_vec()).collect();
    let mut shared = 0;
    for record in &histories[0] {
        if let Some(other) = histories[1].iter().find(|r| r.time == record.time && r.seq == record.seq) {
            assert_eq!(record.hash, other.hash, "the replicas disagree at {} ms / seq {}", record.time, record.seq);
            shared += 1;
        }
    }
    assert!(shared >= 1, "no shared snapshot point: {histories:?}");
    assert!(histories.iter().all(|h| h.iter().any(|r| r.time > last_event)));
    for app in &apps {
        let problems = &app.world().resource::<Problems>().0;
        assert!(problems.is_empty(), "problems reported: {problems:?}");
    }
    drop(apps);
    drop(reflector);
}
