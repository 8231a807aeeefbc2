//! Tests of the sans-IO reflector core.
use super::*;
use synq_protocol::crypto::Sealed;

const SESSION: SessionId = SessionId([1; 32]);

fn sealed(n: usize) -> Sealed {
    Sealed { nonce: [0; 24], ciphertext: vec![7; n] }
}

fn join(view: u64) -> ClientMessage {
    ClientMessage::Join(Join {
        protocol: PROTOCOL_VERSION,
        app_id: "io.example.test".into(),
        api_key: None,
        session_id: SESSION,
        persistent_id: PersistentId([2; 32]),
        view_id: ViewId(view),
        tick_ms: 50,
        password_check: sealed(16),
        resume_after: None,
    })
}

fn sent(r: &mut Reflector) -> Vec<(ClientId, ServerMessage)> {
    r.drain_outputs()
        .map(|o| match o {
            Output::Send { client, message } => (client, (*message).clone()),
            Output::Close { client, reason } => (client, ServerMessage::Error(reason)),
        })
        .collect()
}

fn events(out: &[(ClientId, ServerMessage)], client: ClientId) -> Vec<StampedEvent> {
    out.iter()
        .filter(|(c, _)| *c == client)
        .filter_map(|(_, m)| match m {
            ServerMessage::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn joined(r: &mut Reflector, now: u64, client: ClientId, view: u64) -> Sync {
    r.connect(now, client);
    r.handle(now, client, join(view));
    let out = sent(r);
    match out.iter().find(|(c, _)| *c == client) {
        Some((_, ServerMessage::Sync(sync))) => sync.clone(),
        other => panic!("expected a sync, got {other:?}"),
    }
}

#[test]
fn events_are_stamped_in_order_from_just_below_the_wrap_and_broadcast() {
    let mut r = Reflector::new(ReflectorConfig::default());
    let sync = joined(&mut r, 1000, 1, 10);
    assert!(matches!(sync.start, SyncStart::Fresh { persisted: None }));
    assert_eq!(sync.seq, INITIAL_SEQ);
    joined(&mut r, 1000, 2, 20);
    let mut seqs = Vec::new();
    for i in 0..20 {
        r.handle(1000 + i, 1, ClientMessage::Event(sealed(8)));
        let out = sent(&mut r);
        let to_1 = events(&out, 1);
        assert_eq!(to_1, events(&out, 2), "both clients get the same stamped event");
        seqs.push(to_1[0].seq);
        assert_eq!(to_1[0].time, i);
    }
    assert_eq!(seqs[0], INITIAL_SEQ.wrapping_add(1));
    assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    assert!(seqs.contains(&0), "wrapped around");
}

#[test]
fn ticks_only_after_silence() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    r.poll(30);
    assert!(sent(&mut r).iter().all(|(_, m)| !matches!(m, ServerMessage::Tick(_))));
    r.handle(40, 1, ClientMessage::Event(sealed(8)));
    r.poll(80);
    assert!(sent(&mut r).iter().all(|(_, m)| !matches!(m, ServerMessage::Tick(_))), "event at 40 resets the timer");
    r.poll(90);
    assert!(sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::Tick(90))));
    assert_eq!(r.next_deadline(), Some(140));
}

#[test]
fn joins_and_leaves_are_batched_and_cancel_out() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 50, 2, 20);
    r.disconnect(100, 2);
    // Back within the leave delay: view 20 never left.
    r.connect(600, 3);
    r.handle(600, 3, join(20));
    r.poll(2000);
    let mut out = sent(&mut r);
    r.connect(2000, 4);
    r.handle(2000, 4, join(40));
    r.disconnect(2050, 4); // gone for good
    for now in [2100, 2300, 3400, 3700] {
        r.poll(now);
        out.extend(sent(&mut r));
    }
    let users: Vec<_> =
        events(&out, 1).into_iter().map(|e| e.body).filter(|b| matches!(b, EventBody::Users { .. })).collect();
    assert_eq!(
        users,
        vec![
            EventBody::Users { joined: vec![ViewId(10), ViewId(20)], left: vec![], reset: false },
            EventBody::Users { joined: vec![ViewId(40)], left: vec![], reset: false },
            EventBody::Users { joined: vec![], left: vec![ViewId(40)], reset: false },
        ]
    );
}

#[test]
fn votes_elect_an_uploader_and_the_snapshot_replaces_the_events_it_covers() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20);
    r.poll(300);
    for _ in 0..5 {
        r.handle(400, 1, ClientMessage::Event(sealed(8)));
    }
    let covered = INITIAL_SEQ.wrapping_add(4);
    sent(&mut r);
    let vote = HashVote { purpose: VotePurpose::Snapshot, time: 400, seq: covered, vote: [9; 32], parts: vec![] };
    r.handle(401, 2, ClientMessage::HashVote(vote.clone()));
    r.handle(402, 1, ClientMessage::HashVote(vote));
    let out = sent(&mut r);
    let tally = out
        .iter()
        .find_map(|(_, m)| match m {
            ServerMessage::Tally(t) => Some(t.clone()),
            _ => None,
        })
        .expect("tally once everyone voted");
    assert_eq!(tally.groups.len(), 1);
    assert_eq!(tally.uploader, Some(ViewId(20)), "the first voter uploads");
    // An upload by someone else is ignored.
    let record = SnapshotRecord { time: 400, seq: covered, vote: [9; 32], data: sealed(100) };
    r.handle(403, 1, ClientMessage::SnapshotUpload(record.clone()));
    assert!(r.snapshot(&SESSION).is_none());
    r.handle(403, 2, ClientMessage::SnapshotUpload(record));
    assert!(r.snapshot(&SESSION).is_some());
    assert_eq!(r.buffered_events(&SESSION), Some(2), "events after the snapshot remain");
    let sync = joined(&mut r, 500, 3, 30);
    assert!(matches!(sync.start, SyncStart::Snapshot(ref s) if s.seq == covered));
    assert_eq!(sync.events.len(), 2);
    assert_eq!(sync.events[0].seq, covered.wrapping_add(1));
}

#[test]
fn divergent_votes_are_grouped_consensus_first() {
    let mut r = Reflector::new(ReflectorConfig::default());
    for (client, view) in [(1, 10), (2, 20), (3, 30)] {
        joined(&mut r, 0, client, view);
    }
    sent(&mut r);
    r.handle(
        10,
        1,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Snapshot,
            time: 5,
            seq: 1,
            vote: [1; 32],
            parts: vec![],
        }),
    );
    r.handle(
        10,
        2,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Snapshot,
            time: 5,
            seq: 1,
            vote: [2; 32],
            parts: vec![],
        }),
    );
    r.handle(
        10,
        3,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Snapshot,
            time: 5,
            seq: 1,
            vote: [2; 32],
            parts: vec![],
        }),
    );
    let tally = sent(&mut r)
        .into_iter()
        .find_map(|(_, m)| match m {
            ServerMessage::Tally(t) => Some(t),
            _ => None,
        })
        .unwrap();
    assert_eq!(tally.groups[0].views, vec![ViewId(20), ViewId(30)]);
    assert_eq!(tally.groups[1].views, vec![ViewId(10)]);
    assert_eq!(tally.uploader, Some(ViewId(20)));
}

#[test]
fn a_tally_closes_after_its_window_without_every_vote() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20);
    sent(&mut r);
    r.handle(
        10,
        1,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Snapshot,
            time: 5,
            seq: 1,
            vote: [1; 32],
            parts: vec![],
        }),
    );
    r.poll(500);
    assert!(!sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::Tally(_))));
    r.poll(1010);
    assert!(sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::Tally(_))));
}

#[test]
fn bad_clients_get_clear_errors() {
    let mut r = Reflector::new(ReflectorConfig::default());
    r.connect(0, 1);
    r.handle(0, 1, ClientMessage::Event(sealed(8)));
    assert!(matches!(&sent(&mut r)[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::NotJoined));

    r.connect(0, 2);
    let ClientMessage::Join(mut old) = join(5) else { unreachable!() };
    old.protocol = 99;
    r.handle(0, 2, ClientMessage::Join(old));
    assert!(matches!(&sent(&mut r)[..], [(2, ServerMessage::Error(e))] if e.code == ErrorCode::ProtocolVersion));

    joined(&mut r, 0, 3, 30);
    r.connect(0, 4);
    r.handle(0, 4, join(30));
    assert!(matches!(&sent(&mut r)[..], [(4, ServerMessage::Error(e))] if e.code == ErrorCode::DuplicateView));

    r.handle(0, 3, ClientMessage::Event(sealed(20_000)));
    assert!(matches!(&sent(&mut r)[..], [(3, ServerMessage::Error(e))] if e.code == ErrorCode::TooLarge));
}

#[test]
fn a_full_buffer_asks_for_a_snapshot_then_refuses_events() {
    let config = ReflectorConfig { request_snapshot_at: 5, max_buffered_events: 8, ..Default::default() };
    let mut r = Reflector::new(config);
    joined(&mut r, 0, 1, 10);
    sent(&mut r);
    let mut requested = false;
    for _ in 0..7 {
        r.handle(1, 1, ClientMessage::Event(sealed(8)));
        requested |= events(&sent(&mut r), 1).iter().any(|e| e.body == EventBody::SnapshotRequest);
    }
    assert!(requested);
    r.handle(1, 1, ClientMessage::Event(sealed(8)));
    assert!(matches!(&sent(&mut r)[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::BufferFull));
}

#[test]
fn session_time_pauses_while_empty() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 1000, 1, 10);
    r.disconnect(3000, 1);
    r.poll(4250); // the leave delay ends: the leave is stamped and time pauses
    let sync = joined(&mut r, 60_000, 2, 20);
    assert_eq!(sync.time, 3250);
}

#[test]
fn a_restarted_reflector_resumes_its_sessions_from_storage() {
    let dir = std::env::temp_dir().join(format!("synq-core-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = || Box::new(crate::storage::DiskStorage::open(&dir).unwrap());
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    joined(&mut r, 1000, 1, 10);
    r.poll(1300);
    for i in 0..5 {
        r.handle(1400 + i, 1, ClientMessage::Event(sealed(8)));
    }
    r.poll(2500);
    let before = sent(&mut r);
    let last = events(&before, 1).last().cloned().unwrap();
    let last_tick = before
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Tick(t) => Some(*t),
            _ => None,
        })
        .max()
        .unwrap();
    drop(r); // as if killed: nothing flushed

    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    let sync = joined(&mut r, 50, 2, 20);
    assert!(matches!(sync.start, SyncStart::Fresh { .. }), "no snapshot was stored");
    assert_eq!(sync.seq, last.seq, "sequence numbers continue");
    assert_eq!(sync.events.last(), Some(&last), "every acknowledged event survived");
    assert!(sync.time >= last_tick, "session time continues: {} < {last_tick}", sync.time);
    r.poll(300);
    let users = events(&sent(&mut r), 2);
    assert!(matches!(&users[0].body, EventBody::Users { reset: true, .. }), "{users:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_keys_admit_only_their_app() {
    let mut keys = HashMap::new();
    keys.insert("io.example.test".to_string(), vec!["k1".to_string()]);
    let mut r = Reflector::new(ReflectorConfig { access: AccessControl::ApiKeys(keys), ..Default::default() });
    r.connect(0, 1);
    r.handle(0, 1, join(10));
    let out = sent(&mut r);
    assert!(
        matches!(&out[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied && e.message.contains("API key"))
    );
    let ClientMessage::Join(mut with_key) = join(11) else { unreachable!() };
    with_key.api_key = Some("k1".into());
    r.connect(0, 2);
    r.handle(0, 2, ClientMessage::Join(with_key.clone()));
    assert!(sent(&mut r).iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Sync(_))));
    with_key.api_key = Some("k2".into());
    with_key.view_id = ViewId(12);
    r.connect(0, 3);
    r.handle(0, 3, ClientMessage::Join(with_key));
    assert!(matches!(&sent(&mut r)[..], [(3, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied));
}

#[test]
fn events_beyond_the_rate_limit_are_refused_with_a_reason() {
    let mut r = Reflector::new(ReflectorConfig { max_events_per_second: 10, ..Default::default() });
    joined(&mut r, 0, 1, 10);
    sent(&mut r);
    let mut refused = 0;
    for _ in 0..15 {
        r.handle(100, 1, ClientMessage::Event(sealed(8)));
        refused += sent(&mut r)
            .iter()
            .filter(|(_, m)| matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::RateLimited))
            .count();
    }
    assert_eq!(refused, 5);
    // A second later the bucket is full again.
    r.handle(1100, 1, ClientMessage::Event(sealed(8)));
    assert!(sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::Event(_))));
}

#[test]
fn every_fresh_start_of_a_session_gets_the_persisted_data_it_started_with() {
    let mut r = Reflector::new(ReflectorConfig::default());
    // Data persisted by an earlier session of the same persistent id.
    joined(&mut r, 0, 1, 10);
    let old = PersistRecord { time: 0, vote: [1; 32], data: sealed(10) };
    r.handle(
        0,
        1,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Persist,
            time: 0,
            seq: INITIAL_SEQ,
            vote: [1; 32],
            parts: vec![],
        }),
    );
    r.handle(0, 1, ClientMessage::PersistUpload(old.clone()));
    assert_eq!(r.persisted(&PersistentId([2; 32])), Some(&old));
    // A new session (other code) of the same persistent id starts from it...
    let ClientMessage::Join(mut new_code) = join(20) else { unreachable!() };
    new_code.session_id = SessionId([3; 32]);
    r.connect(10, 2);
    r.handle(10, 2, ClientMessage::Join(new_code.clone()));
    let first = sent(&mut r);
    assert!(first.iter().any(|(c, m)| *c == 2
        && matches!(m, ServerMessage::Sync(s) if s.start == SyncStart::Fresh { persisted: Some(old.clone()) })));
    // ...then persists newer data before any snapshot exists.
    let newer = PersistRecord { time: 5, vote: [2; 32], data: sealed(11) };
    r.handle(
        20,
        2,
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Persist,
            time: 5,
            seq: INITIAL_SEQ,
            vote: [2; 32],
            parts: vec![],
        }),
    );
    r.handle(20, 2, ClientMessage::PersistUpload(newer.clone()));
    assert_eq!(r.persisted(&PersistentId([2; 32])), Some(&newer));
    // A late joiner replays the session from its start: it must get the data the session
    // started from, not the newer one, or its init would differ.
    new_code.view_id = ViewId(30);
    r.connect(30, 3);
    r.handle(30, 3, ClientMessage::Join(new_code));
    let late = sent(&mut r);
    assert!(
        late.iter().any(|(c, m)| *c == 3
            && matches!(m, ServerMessage::Sync(s) if s.start == SyncStart::Fresh { persisted: Some(old.clone()) })),
        "{late:?}"
    );
}
