//! `kill -9` of a real `synq-reflector` process mid-session, restart on the same data directory:
//! the clients reconnect and continue, no acknowledged event is lost, model time continues, and a
//! client that joins afterwards agrees with them.

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
use bevy_synq::transport::udp::UdpConnector;
use bevy_synq::{ModelWorld, SynqClient};
use common::ledger::{Ledger, ledger_len, model, note, play};
use common::model_time;
use common::process::{ReflectorProcess, data_dir, model_resource, run_until, synced, udp_app};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Ten notes from each client (see [`play`]).
fn play_ten(a: &mut App, b: &mut App, from: u32) -> Ledger {
    play(a, b, from, TIMEOUT)
}

fn session(view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", "restart", "pw");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 1_000;
    session
}

/// Two synced clients (views 1 and 2) of the session on the reflector at `addr`.
fn two_clients(addr: std::net::SocketAddr) -> (App, App) {
    let mut a = udp_app(model, session(1), addr);
    let mut b = udp_app(model, session(2), addr);
    all_synced(&mut a, &mut b);
    (a, b)
}

fn all_synced(a: &mut App, b: &mut App) {
    run_until(&mut [a, b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
}

/// Runs the clients until each reconnected at least `times` times and is synced again.
fn back_after(a: &mut App, b: &mut App, times: u32) {
    run_until(&mut [a, b], TIMEOUT, |apps| {
        apps.iter().all(|app| app.world().resource::<SynqClient>().reconnects() >= times && synced(app))
    });
}

#[test]
fn a_killed_reflector_restarts_and_the_session_continues_with_nothing_acknowledged_lost() {
    let dir = data_dir("restart");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
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

    back_after(&mut a, &mut b, 1);
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

fn views(app: &App) -> Vec<ViewId> {
    app.world().resource::<ModelWorld>().runtime().map(|r| r.views().iter().collect()).unwrap_or_default()
}

/// Runs the apps (real time) for `duration` without a reflector.
fn without_reflector(apps: &mut [&mut App], duration: Duration) {
    let down = std::time::Instant::now();
    while down.elapsed() < duration {
        for app in apps.iter_mut() {
            app.update();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn after_a_restart_the_views_in_the_model_are_exactly_the_connected_clients() {
    let dir = data_dir("restart-views");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let mut a = udp_app(model, session(1), addr);
    let mut b = udp_app(model, session(2), addr);
    let mut leaver = udp_app(model, session(3), addr);
    run_until(&mut [&mut a, &mut b, &mut leaver], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    run_until(&mut [&mut a, &mut b, &mut leaver], TIMEOUT, |apps| views(apps[0]).len() == 3);

    reflector.kill();
    drop(leaver); // gone while the reflector was down: it never comes back
    without_reflector(&mut [&mut a, &mut b], Duration::from_millis(300));
    let _restarted = ReflectorProcess::start(&dir, Some(addr));
    back_after(&mut a, &mut b, 1);
    let mut newcomer = udp_app(model, session(4), addr);
    run_until(&mut [&mut a, &mut b, &mut newcomer], TIMEOUT, |apps| {
        apps.iter().all(|app| synced(app)) && apps.iter().all(|app| views(app) == [ViewId(1), ViewId(2), ViewId(4)])
    });
    // Stays so: nothing later removes a live view.
    let settle = std::time::Instant::now();
    while settle.elapsed() < Duration::from_millis(1500) {
        for app in [&mut a, &mut b, &mut newcomer] {
            app.update();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for app in [&a, &b, &newcomer] {
        assert_eq!(views(app), [ViewId(1), ViewId(2), ViewId(4)]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn clients_back_after_a_long_outage_sync_again() {
    let dir = data_dir("restart-long");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
    note(&mut a, 1);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 1));

    reflector.kill();
    // Far longer than the rejoin limit (1 s) and the leave delay (1.25 s).
    without_reflector(&mut [&mut a, &mut b], Duration::from_secs(5));
    let _restarted = ReflectorProcess::start(&dir, Some(addr));
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| synced(app) && views(app) == [ViewId(1), ViewId(2)])
    });
    note(&mut b, 2);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 2));
    assert_eq!(model_resource::<Ledger>(&a), model_resource::<Ledger>(&b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn events_published_around_a_kill_are_executed_exactly_once() {
    let dir = data_dir("restart-burst");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
    // Both publish every frame, before, during and after an outage of the reflector.
    let mut published = 0u32;
    let mut restarted = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        note(&mut a, published);
        note(&mut b, 100_000 + published);
        published += 1;
        a.update();
        b.update();
        if restarted.is_none() && start.elapsed() > Duration::from_millis(1200) {
            reflector.kill();
            restarted = Some(std::time::Instant::now());
        }
        if let Some(at) = restarted
            && at.elapsed() > Duration::from_millis(800)
            && !reflector.is_running()
        {
            reflector = ReflectorProcess::start(&dir, Some(addr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let expected = 2 * published as usize;
    run_until(&mut [&mut a, &mut b], Duration::from_secs(60), |apps| {
        apps.iter().all(|app| synced(app) && ledger_len(app) >= expected)
    });
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| app.world().resource::<SynqClient>().unacknowledged_events() == 0)
    });
    let ledger = model_resource::<Ledger>(&a).unwrap();
    assert_eq!(model_resource::<Ledger>(&b).unwrap(), ledger, "the replicas disagree");
    let mut values: Vec<(u64, u32)> = ledger.0.iter().map(|(view, value, _)| (*view, *value)).collect();
    values.sort();
    let mut wanted: Vec<(u64, u32)> =
        (0..published).map(|n| (1, n)).chain((0..published).map(|n| (2, 100_000 + n))).collect();
    wanted.sort();
    assert_eq!(values.len(), expected, "executed {} events for {expected} published", values.len());
    assert_eq!(values, wanted, "an event was lost or executed twice");
    // Each client's events in the order it published them.
    for view in [1, 2] {
        let order: Vec<u32> = ledger.0.iter().filter(|(v, _, _)| *v == view).map(|(_, n, _)| *n).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "view {view}'s events out of order");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_reflector_that_lost_its_storage_continues_the_session_from_the_replicas() {
    let dir = data_dir("restart-wiped");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
    for i in 0..10 {
        note(&mut a, i);
        run_until(&mut [&mut a, &mut b], TIMEOUT, |_| true);
    }
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 10));
    let before = model_resource::<Ledger>(&a).unwrap();
    let time_before = model_time(&a);

    // The machine is replaced: same address, nothing of the session on disk.
    reflector.kill();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    without_reflector(&mut [&mut a, &mut b], Duration::from_millis(300));
    let _replaced = ReflectorProcess::start(&dir, Some(addr));
    let mut times = (model_time(&a), model_time(&b));
    let mut went_back = false;
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        let now = (model_time(apps[0]), model_time(apps[1]));
        went_back |= now.0 < times.0 || now.1 < times.1;
        times = now;
        apps.iter().all(|app| app.world().resource::<SynqClient>().reconnects() >= 1 && synced(app))
    });
    note(&mut b, 99);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| ledger_len(app) == 11));
    let after = model_resource::<Ledger>(&a).unwrap();
    assert_eq!(&after.0[..10], &before.0[..], "the game was lost: the model restarted");
    assert!(!went_back, "model time went back");
    assert!(model_time(&a) >= time_before);
    // A newcomer joins once the replicas gave the new reflector a snapshot, and agrees.
    let mut c = udp_app(model, session(3), addr);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]) && ledger_len(apps[2]) == 11);
    assert_eq!(model_resource::<Ledger>(&c).unwrap(), after);
    let _ = std::fs::remove_dir_all(dir);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_session_rolled_back_on_disk_continues_from_the_replicas() {
    let dir = data_dir("restart-rollback");
    let earlier = data_dir("restart-rollback-copy");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
    play_ten(&mut a, &mut b, 0);
    // Back up the data directory (the reflector stopped for a consistent copy) …
    reflector.kill();
    copy_dir(&dir, &earlier);
    reflector = ReflectorProcess::start(&dir, Some(addr));
    all_synced(&mut a, &mut b);
    let played = play_ten(&mut a, &mut b, 10);
    // … and restore it: the reflector now holds an older state than the replicas.
    reflector.kill();
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&earlier, &dir);
    without_reflector(&mut [&mut a, &mut b], Duration::from_millis(300));
    let _restored = ReflectorProcess::start(&dir, Some(addr));
    back_after(&mut a, &mut b, 2);
    let after = play_ten(&mut a, &mut b, 20);
    assert_eq!(&after.0[..40], &played.0[..], "events the replicas executed were lost with the rollback");
    let mut c = udp_app(model, session(3), addr);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]) && ledger_len(apps[2]) == 60);
    assert_eq!(model_resource::<Ledger>(&c).unwrap(), after);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(earlier);
}

#[test]
fn a_damaged_event_log_is_restored_from_the_replicas() {
    let dir = data_dir("restart-damaged-log");
    let mut reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let (mut a, mut b) = two_clients(addr);
    let played = play_ten(&mut a, &mut b, 0);
    reflector.kill();
    // A flipped byte in the middle of the session's log: a record in the middle is lost.
    let sessions = dir.join("sessions");
    let session_dir = std::fs::read_dir(&sessions).unwrap().next().unwrap().unwrap().path();
    let log = session_dir.join("events.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    without_reflector(&mut [&mut a, &mut b], Duration::from_millis(300));
    let _restarted = ReflectorProcess::start(&dir, Some(addr));
    back_after(&mut a, &mut b, 1);
    let after = play_ten(&mut a, &mut b, 10);
    assert_eq!(&after.0[..20], &played.0[..], "events were lost with the damaged record");
    assert_eq!(model_resource::<Ledger>(&b).unwrap(), after);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn clients_whose_reflector_dies_move_to_the_next_in_their_list_and_continue_there() {
    let dir = data_dir("restart-moved");
    let other_dir = data_dir("restart-moved-other");
    let mut first = ReflectorProcess::start(&dir, None);
    // Another reflector, on another port, with nothing of the session.
    let second = ReflectorProcess::start(&other_dir, None);
    let target = || {
        let connector = UdpConnector::new(first.addr, DEFAULT_PROTOCOL_ID)
            .with_fallbacks([second.addr])
            .with_connect_timeout(Duration::from_millis(500));
        ReflectorTarget::custom(connector)
    };
    let mut a = common::process::app_with(model, session(1), target());
    let mut b = common::process::app_with(model, session(2), target());
    all_synced(&mut a, &mut b);
    let played = play_ten(&mut a, &mut b, 0);
    // The first one dies: the clients find it gone, try the next address, and reseed there.
    first.kill();
    back_after(&mut a, &mut b, 1);
    for app in [&a, &b] {
        let reflector = app.world().resource::<SynqConnection>().reflector.clone().unwrap_or_default();
        assert!(reflector.contains(&second.addr.to_string()), "{reflector}");
    }
    let after = play_ten(&mut a, &mut b, 10);
    assert_eq!(&after.0[..20], &played.0[..], "the game was lost in the move");
    let mut c = udp_app(model, session(3), second.addr);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]) && ledger_len(apps[2]) == 40);
    assert_eq!(model_resource::<Ledger>(&c).unwrap(), after);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other_dir);
}
