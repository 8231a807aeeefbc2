//! Attacks on a session, against a real `synq-reflector` process over real UDP on loopback, by a
//! hostile client written against the wire protocol (`common::hostile`). Each test asserts the
//! outcome `SECURITY.md` promises. (Malformed datagrams below the wire protocol, idle slot holders
//! and per-address connection limits are attacked in `crates/synq_reflector/tests/datagrams.rs`.)

mod common;

use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::protocol::crypto::{KdfParams, Sealed, SessionKey};
use bevy_synq::protocol::membership::MemberSignature;
use bevy_synq::protocol::wire::{
    ClientMessage, ErrorCode, EventBody, HashVote, PersistRecord, ServerMessage, SnapshotRecord, VotePurpose,
};
use bevy_synq::protocol::{INITIAL_SEQ, SessionId};
use bevy_synq::{ModelWorld, SynqClient};
use common::hostile::Hostile;
use common::process::{ReflectorProcess, data_dir, model_resource, run_for, run_until, synced, udp_app};
use common::sum::{Sum, add, model};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);
const APP: &str = "io.bevy-synq.attacks";

/// Held by the two tests that must not share the machine's cores: the vote flood checks that its
/// replicas hear from their reflector within their 2 s silence limit, which a thousand sessions
/// opened and abandoned at the same time on 2 cores can starve them of.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn session(name: &str, view: u64, password: &str) -> SessionConfig {
    let mut session = SessionConfig::new(APP, name, password);
    session.kdf = KdfParams::INSECURE_FAST;
    session.view_id = Some(ViewId(view));
    session
}

/// The session key of `name` with `password`, as the model's clients derive it.
fn key_of(name: &str, password: &str, app: &App) -> SessionKey {
    let ids = app.world().resource::<SynqClient>().ids();
    SessionKey::derive(password, &ids.persistent, session(name, 0, password).kdf).unwrap()
}

fn views(app: &App) -> Vec<ViewId> {
    app.world().resource::<ModelWorld>().runtime().map(|r| r.views().iter().collect()).unwrap_or_default()
}

#[test]
fn an_event_that_does_not_open_is_skipped_by_every_replica_and_a_late_joiner() {
    let dir = data_dir("attack-garbage");
    let reflector = ReflectorProcess::start(&dir, None);
    let garbage_session = |view| {
        let mut session = session("garbage", view, "pw");
        session.snapshot_policy.every_ms = 250;
        session
    };
    let mut a = udp_app(model, garbage_session(1), reflector.addr);
    let mut b = udp_app(model, garbage_session(2), reflector.addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    add(&mut a, 5);
    // A member's broken (or malicious) client sends events that do not open.
    let ids = a.world().resource::<SynqClient>().ids();
    let mut hostile = Hostile::connect(reflector.addr);
    let key = SessionKey::derive("pw", &ids.persistent, KdfParams::INSECURE_FAST).unwrap();
    let join = hostile.signed_join(&key, APP, ids.session, ids.persistent, ViewId(666));
    hostile.send(ClientMessage::Join(join));
    assert!(hostile.synced(TIMEOUT));
    for i in 0..5u8 {
        hostile.send(ClientMessage::Event(Sealed { nonce: [i; 24], ciphertext: vec![i; 40] }.into()));
    }
    add(&mut b, 7);
    run_for(&mut [&mut a, &mut b], Duration::from_millis(800));
    add(&mut a, 11);
    let mut late = udp_app(model, garbage_session(3), reflector.addr);
    run_until(&mut [&mut a, &mut b, &mut late], TIMEOUT, |apps| {
        apps.iter().all(|app| synced(app) && model_resource::<Sum>(app).is_some_and(|s| s.0 == 23))
    });
    run_for(&mut [&mut a, &mut b, &mut late], Duration::from_millis(1000));
    for app in [&a, &b, &late] {
        assert!(status_is_synced(app), "a replica stopped: {:?}", app.world().resource::<SynqStatus>());
    }
    let skipped = |app: &App| {
        app.world()
            .resource::<common::Problems>()
            .0
            .iter()
            .filter(|p| matches!(p, SynqProblem::Model(bevy_synq::ModelProblem::BadViewEvent { sender, .. }) if *sender == ViewId(666)))
            .count()
    };
    assert_eq!((skipped(&a), skipped(&b)), (5, 5), "every replica reports the skipped events");
    // Replicas run in real time, each at its own pace: compare them where they must agree, at the
    // snapshot points they share.
    let mut points = std::collections::BTreeMap::<(u64, u32), Vec<[u8; 32]>>::new();
    for app in [&a, &b, &late] {
        for record in app.world().resource::<SynqClient>().hash_history() {
            points.entry((record.time, record.seq)).or_default().push(record.hash);
        }
    }
    let shared: Vec<_> = points.values().filter(|hashes| hashes.len() > 1).collect();
    assert!(!shared.is_empty(), "no shared snapshot point");
    assert!(shared.iter().all(|hashes| hashes.windows(2).all(|w| w[0] == w[1])), "replicas differ after skipping");
    let _ = std::fs::remove_dir_all(dir);
}

fn status_is_synced(app: &App) -> bool {
    app.world().resource::<SynqStatus>().is_synced()
}

#[test]
fn a_wrong_password_is_refused_and_never_appears_in_the_model() {
    let dir = data_dir("attack-password");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut honest = udp_app(model, session("pw", 1, "right"), reflector.addr);
    run_until(&mut [&mut honest], TIMEOUT, |apps| synced(apps[0]));
    let mut intruder = udp_app(model, session("pw", 2, "wrong"), reflector.addr);
    let mut seen_intruder = false;
    run_until(&mut [&mut honest, &mut intruder], TIMEOUT, |apps| {
        seen_intruder |= views(apps[0]).contains(&ViewId(2));
        matches!(*apps[1].world().resource::<SynqStatus>(), SynqStatus::Disconnected { .. })
    });
    run_for(&mut [&mut honest], Duration::from_millis(500));
    seen_intruder |= views(&honest).contains(&ViewId(2));
    let SynqStatus::Disconnected { reason } = intruder.world().resource::<SynqStatus>().clone() else { unreachable!() };
    assert!(reason.contains("wrong session password"), "{reason}");
    assert!(!seen_intruder, "the intruder appeared in the honest model");
    assert_eq!(views(&honest), vec![ViewId(1)]);
    assert!(intruder.world().resource::<ModelWorld>().runtime().is_none(), "the intruder got the session's state");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn forged_and_replayed_joins_are_refused() {
    let dir = data_dir("attack-forged");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut honest = udp_app(model, session("forged", 1, "pw"), reflector.addr);
    run_until(&mut [&mut honest], TIMEOUT, |apps| synced(apps[0]));
    let ids = honest.world().resource::<SynqClient>().ids();
    let key = key_of("forged", "pw", &honest);

    // Forged: the session's (public) member key, a signature made with another key.
    let mut forger = Hostile::connect(reflector.addr);
    let other = SessionKey::from_master(&[66; 32]);
    let mut forged = forger.signed_join(&other, APP, ids.session, ids.persistent, ViewId(7));
    forged.member_key = key.member_key();
    forger.send(ClientMessage::Join(forged));
    assert_eq!(forger.error(TIMEOUT).map(|e| e.0), Some(ErrorCode::AccessDenied));

    // Replayed: a genuine join (as a passive observer could record it) sent on another connection.
    let recorded = Hostile::connect(reflector.addr).signed_join(&key, APP, ids.session, ids.persistent, ViewId(8));
    let mut replayer = Hostile::connect(reflector.addr);
    replayer.send(ClientMessage::Join(recorded));
    assert_eq!(replayer.error(TIMEOUT).map(|e| e.0), Some(ErrorCode::AccessDenied));
    assert!(!replayer.synced(Duration::from_millis(200)));

    run_for(&mut [&mut honest], Duration::from_millis(1500));
    assert_eq!(views(&honest), vec![ViewId(1)], "a refused join reached the model");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn squatting_a_known_name_with_another_password_is_refused() {
    let dir = data_dir("attack-squat");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut honest = udp_app(model, session("squat", 1, "pw"), reflector.addr);
    run_until(&mut [&mut honest], TIMEOUT, |apps| synced(apps[0]));
    let ids = honest.world().resource::<SynqClient>().ids();
    // The squatter knows the app id and the name (so the persistent id) and creates the session
    // of the next code version first.
    let next_version = SessionId([0x5E; 32]);
    let mut squatter = Hostile::connect(reflector.addr);
    let join = squatter.signed_join(&SessionKey::from_master(&[66; 32]), APP, next_version, ids.persistent, ViewId(9));
    squatter.send(ClientMessage::Join(join));
    let refusal = squatter.error(TIMEOUT);
    assert!(
        matches!(&refusal, Some((ErrorCode::WrongPassword, m)) if m.contains("wrong session password")),
        "{refusal:?}"
    );
    // The rightful password still opens that version.
    let mut rightful = Hostile::connect(reflector.addr);
    let join = rightful.signed_join(&key_of("squat", "pw", &honest), APP, next_version, ids.persistent, ViewId(10));
    rightful.send(ClientMessage::Join(join));
    assert!(rightful.synced(TIMEOUT));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn uploads_from_non_members_are_refused_and_stored_bytes_stay() {
    let dir = data_dir("attack-uploads");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut honest = udp_app(model, session("uploads", 1, "pw"), reflector.addr);
    run_until(&mut [&mut honest], TIMEOUT, |apps| synced(apps[0]));
    add(&mut honest, 3);
    run_for(&mut [&mut honest], Duration::from_millis(300));
    let ids = honest.world().resource::<SynqClient>().ids();
    let before = stored_files(&dir);
    assert!(!before.is_empty());

    let garbage = Sealed { nonce: [1; 24], ciphertext: vec![0xAB; 64] };
    let snapshot = SnapshotRecord {
        time: 0,
        seq: INITIAL_SEQ,
        vote: [1; 32],
        data: garbage.clone(),
        signature: MemberSignature::EMPTY,
    };
    let persist = PersistRecord { time: 0, vote: [1; 32], data: garbage, signature: MemberSignature::EMPTY };
    let vote = HashVote { purpose: VotePurpose::Persist, time: 0, seq: INITIAL_SEQ, vote: [1; 32], parts: vec![] };
    // Without joining.
    let mut outsider = Hostile::connect(reflector.addr);
    outsider.send(ClientMessage::HashVote(vote.clone()));
    outsider.send(ClientMessage::PersistUpload(persist.clone()));
    assert_eq!(outsider.error(TIMEOUT).map(|e| e.0), Some(ErrorCode::NotJoined));
    // After a refused join (wrong password), everything it sends is ignored.
    let mut intruder = Hostile::connect(reflector.addr);
    let join = intruder.signed_join(&SessionKey::from_master(&[66; 32]), APP, ids.session, ids.persistent, ViewId(5));
    intruder.send(ClientMessage::Join(join));
    intruder.send(ClientMessage::HashVote(vote));
    intruder.send(ClientMessage::SnapshotUpload(snapshot));
    intruder.send(ClientMessage::PersistUpload(persist));
    assert_eq!(intruder.error(TIMEOUT).map(|e| e.0), Some(ErrorCode::WrongPassword));
    run_for(&mut [&mut honest], Duration::from_millis(500));
    assert_eq!(stored_files(&dir), before, "a non-member changed stored data");
    assert!(status_is_synced(&honest));
    let _ = std::fs::remove_dir_all(dir);
}

/// Every stored file but the event logs (which grow with ticks' time marks), with its bytes.
fn stored_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none_or(|e| e != "log") {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn vote_floods_and_oversized_votes_are_bounded() {
    let _alone = HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = data_dir("attack-votes");
    let reflector = ReflectorProcess::start(&dir, None);
    let mut a = udp_app(model, session("votes", 1, "pw"), reflector.addr);
    let mut b = udp_app(model, session("votes", 2, "pw"), reflector.addr);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| apps.iter().all(|app| synced(app)));
    let ids = a.world().resource::<SynqClient>().ids();
    let mut voter = Hostile::connect(reflector.addr);
    let join = voter.signed_join(&key_of("votes", "pw", &a), APP, ids.session, ids.persistent, ViewId(9));
    voter.send(ClientMessage::Join(join));
    assert!(voter.synced(TIMEOUT));
    // Oversized: refused with a reason, the connection kept.
    let big = HashVote { purpose: VotePurpose::Snapshot, time: 1, seq: 1, vote: [1; 32], parts: vec![[7; 32]; 1025] };
    voter.send(ClientMessage::HashVote(big));
    assert_eq!(voter.error(TIMEOUT).map(|e| e.0), Some(ErrorCode::TooLarge));
    // A flood of the largest allowed votes for made-up points (2 MB), sent from another thread
    // while the replicas run: metered, and never echoed at length to the others.
    let flood = std::thread::spawn(move || {
        for time in 0..60 {
            let parts = vec![[7; 32]; 1024];
            voter.send(ClientMessage::HashVote(HashVote {
                purpose: VotePurpose::Snapshot,
                time,
                seq: 1,
                vote: [1; 32],
                parts,
            }));
            voter.pump();
        }
        voter
    });
    add(&mut a, 1);
    run_for(&mut [&mut a, &mut b], Duration::from_millis(2500));
    let mut voter = flood.join().unwrap();
    voter.pump();
    add(&mut b, 2);
    run_until(&mut [&mut a, &mut b], TIMEOUT, |apps| {
        apps.iter().all(|app| model_resource::<Sum>(app).is_some_and(|s| s.0 == 3))
    });
    for app in [&a, &b] {
        let client = app.world().resource::<SynqClient>();
        assert!(
            client.is_synced() && client.reconnects() == 0,
            "the flood disturbed a replica: {:?}, {} reconnects",
            client.status(),
            client.reconnects()
        );
    }
    assert!(voter.closed.is_none(), "votes within the limits do not close the connection");
    let tallies: Vec<_> = voter
        .received
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Tally(tally) if tally.groups.len() == 1 => Some(tally.groups[0].parts.len()),
            _ => None,
        })
        .collect();
    assert!(!tallies.is_empty() && tallies.len() <= 40, "{} tallies for 60 votes: not metered", tallies.len());
    assert!(tallies.iter().all(|parts| *parts == 0), "single-group tallies echo the parts");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_thousand_abandoned_sessions_are_unloaded_and_their_memory_returned() {
    let _alone = HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = data_dir("attack-abandon");
    // Sessions stay in memory 60 s after their last client left: several hundred at the peak even
    // when opening the thousand takes two minutes on a loaded machine.
    let options = ["--idle-unload-ms", "60000", "--max-sessions-per-origin", "5000", "--max-connections-per-ip", "64"];
    let reflector = ReflectorProcess::start_with(&dir, None, &options);
    let key = SessionKey::from_master(&[3; 32]);
    let id = |i: u32| {
        let mut id = [0; 32];
        id[..4].copy_from_slice(&i.to_le_bytes());
        id
    };
    // Opens sessions `first..first + count`, each with 60 KB of events, and abandons each.
    let open = &|first: u32, count: u32| {
        for i in first..first + count {
            let mut hostile = Hostile::connect(reflector.addr);
            let persistent = bevy_synq::protocol::PersistentId(id(i));
            let join = hostile.signed_join(&key, APP, SessionId(id(i)), persistent, ViewId(1));
            hostile.send(ClientMessage::Join(join));
            assert!(hostile.synced(TIMEOUT), "session {i} not opened: {:?}", hostile.closed);
            for n in 0..4u8 {
                hostile.send(ClientMessage::Event(Sealed { nonce: [n; 24], ciphertext: vec![n; 15_000] }.into()));
            }
            let last = |m: &ServerMessage| match m {
                ServerMessage::Event(e) => matches!(&e.body, EventBody::View { payload, .. } if payload.nonce[0] == 3),
                _ => false,
            };
            let arrived = hostile.wait_for("the last event", TIMEOUT, |m| last(m).then_some(()));
            assert!(
                arrived.is_some(),
                "session {i}: {:?}",
                hostile
                    .received
                    .iter()
                    .map(|m| format!("{m:?}").chars().take(120).collect::<String>())
                    .collect::<Vec<_>>()
            );
        }
    };
    open(0, 16);
    std::thread::sleep(Duration::from_secs(1));
    let baseline = reflector.rss_kib();
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(reflector.rss_kib());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let openers: Vec<_> = (0..4).map(|t| scope.spawn(move || open(16 + t * 248, 248))).collect();
        for opener in openers {
            opener.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    let mut after = peak;
    for _ in 0..1200 {
        std::thread::sleep(Duration::from_millis(100));
        after = reflector.rss_kib();
        if after < baseline + (peak - baseline) / 4 {
            break;
        }
    }
    println!(
        "reflector RSS: baseline {baseline} KiB, peak {peak} KiB while 1,008 sessions were opened, {after} KiB after the idle time"
    );
    assert!(peak > baseline + 15_000, "the sessions did not hold memory: {baseline} → {peak} KiB");
    assert!(after < baseline + (peak - baseline) / 4, "memory not given back: {baseline} → {peak} → {after} KiB");
    // Unloaded, not lost: a session comes back from storage with its events.
    let mut back = Hostile::connect(reflector.addr);
    let persistent = bevy_synq::protocol::PersistentId(id(500));
    let join = back.signed_join(&key, APP, SessionId(id(500)), persistent, ViewId(2));
    back.send(ClientMessage::Join(join));
    let events = back.wait_for("the sync", TIMEOUT, |m| match m {
        ServerMessage::Sync(sync) => Some(sync.events.len()),
        _ => None,
    });
    assert!(events.is_some_and(|n| n >= 4), "the unloaded session lost its events: {events:?}");
    let _ = std::fs::remove_dir_all(dir);
}
