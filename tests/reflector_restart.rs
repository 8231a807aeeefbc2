//! `kill -9` of a real `synq-reflector` process mid-session, restart on the same data directory:
//! the clients reconnect and continue, no acknowledged event is lost, model time continues, and a
//! client that joins afterwards agrees with them.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::{ModelWorld, SynqClient};
use common::process::{ReflectorProcess, data_dir, model_resource, run_until, synced, udp_app};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Clone)]
struct Note(u32);

/// Every event, in the order the model executed it.
#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
struct Ledger(Vec<(u64, u32, u64)>);

fn model(model: &mut ModelApp) {
    model.init_resource::<Ledger>().add_view_event::<Note>().add_observer(
        |note: On<FromView<Note>>, mut ledger: ResMut<Ledger>, time: Res<ModelTime>| {
            ledger.0.push((note.view.0, note.0, time.now_ms()));
        },
    );
}

fn session(view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", "restart", "pw");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 1_000;
    session
}

fn note(app: &mut App, value: u32) {
    app.world_mut()
        .run_system_once_with(|In(value): In<u32>, mut publish: Publish<Note>| publish.send(Note(value)), value)
        .unwrap();
}

fn model_time(app: &App) -> u64 {
    app.world().resource::<ModelWorld>().runtime().map_or(0, |r| r.now_ms())
}

fn ledger_len(app: &App) -> usize {
    model_resource::<Ledger>(app).map_or(0, |l| l.0.len())
}

#[test]
fn a_killed_reflector_restarts_and_the_session_continues_with_nothing_acknowledged_lost() {
    let dir = data_dir("restart");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let mut a = udp_app(model, session(1), addr);
    let mut b = udp_app(model, session(2), addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    for i in 0..10 {
        note(&mut a, i);
        note(&mut b, 100 + i);
        run_until(&mut [&mut a, &mut b], TIMEOUT, |_| true);
    }
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 20));
    let acknowledged = model_resource::<Ledger>(&a).unwrap();
    let time_before = model_time(&a);

    reflector.kill();
    // A while without a reflector: the clients notice the silence and keep trying.
    let down = std::time::Instant::now();
    while down.elapsed() < Duration::from_millis(300) {
        a.update();
        b.update();
        std::thread::sleep(Duration::from_millis(5));
    }
    let _restarted = ReflectorProcess::start(&dir, Some(addr));

    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| app.world().resource::<SynqClient>().reconnects() >= 1 && synced(app))
    });
    for i in 0..5 {
        note(&mut a, 1000 + i);
    }
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 25));

    let after = model_resource::<Ledger>(&a).unwrap();
    assert_eq!(&after.0[..20], &acknowledged.0[..], "acknowledged events changed");
    assert_eq!(model_resource::<Ledger>(&b).unwrap(), after, "the replicas disagree");
    assert!(model_time(&a) >= time_before, "model time went back: {} < {time_before}", model_time(&a));
    assert!(after.0[20].2 >= acknowledged.0[19].2, "new events are stamped after the old ones");

    // A client that joins after the restart agrees.
    let mut c = udp_app(model, session(3), addr);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]));
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| {
        let times: Vec<u64> = apps.iter().map(|app| model_time(app)).collect();
        times.windows(2).all(|w| w[0] == w[1])
    });
    assert_eq!(model_resource::<Ledger>(&c).unwrap(), after);
    for app in [&a, &b, &c] {
        let problems = &app.world().resource::<common::Problems>().0;
        assert!(problems.is_empty(), "{problems:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
