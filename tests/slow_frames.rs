//! An app that runs a frame only every few seconds (loading, a minimised window, a reactive update
//! mode) stays connected to a real `synq-reflector` over UDP: its connection's network thread
//! keeps acknowledging and keeping the connection alive while the app sleeps, even through a
//! stall longer than netcode's connection timeout (15 s). It never reconnects, executes everything a normal app
//! published meanwhile, and a late joiner agrees with both.

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::KdfParams;
use bevy_synq::{HashRecord, SynqClient};
use common::process::{ReflectorProcess, data_dir, model_resource, run_until, synced, udp_app};
use common::sum::{Sum, add, model};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);
/// The fast app's frame interval.
const FRAME: Duration = Duration::from_millis(16);
/// When the slow app runs its frames, from the start of the slow phase: every 3 s (longer than
/// the session's default silence limit, 2 s) for 12 s, then one stall of 16 s (longer than
/// netcode's connection timeout, 15 s in its unsecure mode: without a network thread that runs
/// while the app sleeps, the connection is lost at both ends).
const SLOW_FRAMES_AT: [Duration; 5] = [
    Duration::from_secs(3),
    Duration::from_secs(6),
    Duration::from_secs(9),
    Duration::from_secs(12),
    Duration::from_secs(28),
];

fn session(view: u64) -> SessionConfig {
    let mut session = SessionConfig::new("io.bevy-synq.tests", "slow-frames", "pw");
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session.snapshot_policy.every_ms = 1_000;
    session
}

fn client(app: &App) -> &SynqClient {
    app.world().resource::<SynqClient>()
}

fn sum(app: &App) -> Sum {
    model_resource::<Sum>(app).unwrap_or_default()
}

/// Asserts that every two apps agree at every snapshot point they share; returns how many points
/// each later app shares with the first.
fn assert_histories_agree(apps: &[&App]) -> Vec<usize> {
    let histories: Vec<&[HashRecord]> = apps.iter().map(|app| client(app).hash_history()).collect();
    for (i, mine) in histories.iter().enumerate() {
        for (j, theirs) in histories.iter().enumerate().skip(i + 1) {
            for record in mine.iter() {
                if let Some(other) = theirs.iter().find(|r| r.time == record.time && r.seq == record.seq) {
                    assert_eq!(
                        record.hash, other.hash,
                        "apps {i} and {j} disagree at the snapshot point {} ms / seq {}",
                        record.time, record.seq
                    );
                }
            }
        }
    }
    histories[1..]
        .iter()
        .map(|theirs| histories[0].iter().filter(|r| theirs.iter().any(|o| o.time == r.time && o.seq == r.seq)).count())
        .collect()
}

#[test]
fn an_app_that_runs_a_frame_every_few_seconds_stays_connected_and_in_step() {
    let dir = data_dir("slow-frames");
    let reflector = ReflectorProcess::start(&dir, None);
    let addr = reflector.addr;
    let mut a = udp_app(model, session(1), addr);
    let mut b = udp_app(model, session(2), addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));

    // A runs a frame every 16 ms and publishes every sixth frame; B runs a frame at each of
    // `SLOW_FRAMES_AT` and publishes at each. Both on this thread, interleaved by wall time.
    let mut expected = 0u64;
    let mut value = 1u64;
    let mut slow_frames = 0;
    let start = Instant::now();
    let mut next_fast = start;
    let mut fast_frames = 0u64;
    while slow_frames < SLOW_FRAMES_AT.len() {
        let now = Instant::now();
        let next_slow = start + SLOW_FRAMES_AT[slow_frames];
        if now >= next_slow {
            add(&mut b, 1_000_000 + value);
            expected += 1_000_000 + value;
            value += 1;
            b.update();
            slow_frames += 1;
            assert_eq!(client(&b).reconnects(), 0, "the slow app reconnected after {slow_frames} slow frames");
            assert!(synced(&b), "the slow app is not synced after {slow_frames} slow frames");
        }
        if now >= next_fast {
            if fast_frames.is_multiple_of(6) {
                add(&mut a, value);
                expected += value;
                value += 1;
            }
            a.update();
            fast_frames += 1;
            next_fast = (next_fast + FRAME).max(now);
        }
        let wake = SLOW_FRAMES_AT.get(slow_frames).map_or(next_fast, |at| next_fast.min(start + *at));
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    assert_eq!(client(&a).reconnects(), 0, "the fast app reconnected");
    assert_eq!(client(&b).reconnects(), 0, "the slow app reconnected");

    // Both execute every event, in the same order.
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| sum(app).0 == expected));
    assert_eq!(sum(&a), sum(&b), "the replicas executed different histories");

    // A late joiner agrees with both, and all three pass snapshot points together.
    let mut c = udp_app(model, session(3), addr);
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| synced(apps[2]));
    let joined = client(&c).reflector_time();
    run_until(&mut [&mut a, &mut b, &mut c], TIMEOUT, |apps| {
        apps.iter().all(|app| sum(app).0 == expected)
            && apps.iter().all(|app| client(app).hash_history().iter().any(|r| r.time > joined + 1_000))
    });
    let (sa, sb, sc) = (sum(&a), sum(&b), sum(&c));
    assert!(sa == sb && sb == sc, "the replicas differ: {sa:?} {sb:?} {sc:?}");
    let shared = assert_histories_agree(&[&a, &b, &c]);
    assert!(shared[0] >= 2 && shared[1] >= 1, "too few shared snapshot points: {shared:?}");
    for (name, app) in [("A", &a), ("B", &b), ("C", &c)] {
        assert_eq!(client(app).reconnects(), 0, "app {name} reconnected");
        let problems = &app.world().resource::<common::Problems>().0;
        assert!(problems.is_empty(), "problems reported: {problems:?}");
    }
    drop((a, b, c));
    drop(reflector);
    let _ = std::fs::remove_dir_all(dir);
}
