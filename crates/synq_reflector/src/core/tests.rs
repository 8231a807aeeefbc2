//! Tests of the sans-IO reflector core.
use super::*;
use synq_protocol::crypto::{Sealed, SessionKey};
use synq_protocol::membership::MemberSignature;

const SESSION: SessionId = SessionId([1; 32]);

fn sealed(n: usize) -> Sealed {
    Sealed { nonce: [0; 24], ciphertext: vec![7; n] }
}

/// The key of the session's password in these tests.
fn key() -> SessionKey {
    SessionKey::from_master(&[9; 32])
}

/// A join of `view`, to be signed with [`signed`].
fn join(view: u64) -> Join {
    Join {
        protocol: PROTOCOL_VERSION,
        app_id: "io.example.test".into(),
        api_key_proof: None,
        session_id: SESSION,
        persistent_id: PersistentId([2; 32]),
        view_id: ViewId(view),
        tick_ms: 50,
        resume_after: None,
        held_time: 0,
        member_key: key().member_key(),
        signature: MemberSignature::EMPTY,
    }
}

fn snapshot(time: u64, seq: u32, vote: [u8; 32], data: Sealed) -> SnapshotRecord {
    let mut record = SnapshotRecord { time, seq, vote, data, signature: MemberSignature::EMPTY };
    membership::sign_snapshot(&key(), &SESSION, &mut record);
    record
}

fn persist_record(time: u64, vote: [u8; 32], data: Sealed) -> PersistRecord {
    let mut record = PersistRecord { time, vote, data, signature: MemberSignature::EMPTY };
    membership::sign_persist(&key(), &PersistentId([2; 32]), &mut record);
    record
}

/// Connects `client` and returns the challenge the reflector sent it.
fn connect(r: &mut Reflector, now: u64, client: ClientId) -> Challenge {
    r.connect(now, client);
    let is_challenge = |o: &Output| matches!(o, Output::Send { client: c, message } if *c == client && matches!(**message, ServerMessage::Challenge(_)));
    assert!(r.outputs.iter().any(is_challenge), "every connection is sent a challenge");
    r.outputs.retain(|o| !is_challenge(o));
    r.clients[&client].challenge
}

/// `join` signed by `key` for `challenge`.
fn signed_by(key: &SessionKey, challenge: &Challenge, mut join: Join) -> ClientMessage {
    membership::sign_join(key, challenge, &mut join);
    ClientMessage::Join(join)
}

fn signed(challenge: &Challenge, join: Join) -> ClientMessage {
    signed_by(&key(), challenge, join)
}

/// Connects `client` and sends its signed join of `join`.
fn connect_and_join(r: &mut Reflector, now: u64, client: ClientId, join: Join) {
    let challenge = connect(r, now, client);
    r.handle(now, client, signed(&challenge, join));
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
    connect_and_join(r, now, client, join(view));
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
    assert!(matches!(sync.start, SyncStart::Fresh { persisted: None, persisted_damaged: None }));
    assert_eq!(sync.seq, INITIAL_SEQ);
    joined(&mut r, 1000, 2, 20);
    let mut seqs = Vec::new();
    for i in 0..20 {
        r.handle(1000 + i, 1, ClientMessage::Event(sealed(8).into()));
        let out = sent(&mut r);
        let to_1 = events(&out, 1);
        assert_eq!(to_1, events(&out, 2), "both clients get the same stamped event");
        seqs.push(to_1[0].seq);
        assert_eq!(to_1[0].time, i);
    }
    // The first join, after a quiet period, was stamped at once; the second waits for its batch.
    assert_eq!(seqs[0], INITIAL_SEQ.wrapping_add(2));
    assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    assert!(seqs.contains(&0), "wrapped around");
}

#[test]
fn ticks_only_after_silence() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    r.poll(30);
    assert!(sent(&mut r).iter().all(|(_, m)| !matches!(m, ServerMessage::Tick { .. })));
    r.handle(40, 1, ClientMessage::Event(sealed(8).into()));
    let stamped = sent(&mut r)
        .iter()
        .find_map(|(_, m)| match m {
            ServerMessage::Event(event) => Some(event.seq),
            _ => None,
        })
        .expect("the event was stamped");
    r.poll(80);
    assert!(sent(&mut r).iter().all(|(_, m)| !matches!(m, ServerMessage::Tick { .. })), "event at 40 resets the timer");
    r.poll(90);
    // The tick vouches for every event up to the last one stamped: clients that lack it ignore it.
    let ticks: Vec<_> = sent(&mut r).into_iter().filter(|(_, m)| matches!(m, ServerMessage::Tick { .. })).collect();
    assert!(!ticks.is_empty());
    assert!(ticks.iter().all(|(_, m)| *m == ServerMessage::Tick { time: 90, seq: stamped }));
    assert_eq!(r.next_deadline(), Some(140));
}

#[test]
fn joins_and_leaves_are_batched_and_cancel_out() {
    let mut r = Reflector::new(ReflectorConfig::default());
    connect_and_join(&mut r, 0, 1, join(10));
    let mut out = sent(&mut r);
    connect_and_join(&mut r, 50, 2, join(20));
    r.disconnect(100, 2);
    // Back within the leave delay: view 20 never left.
    connect_and_join(&mut r, 600, 3, join(20));
    r.poll(2000);
    out.extend(sent(&mut r));
    connect_and_join(&mut r, 2000, 4, join(40));
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
            // Stamped at once: nothing was stamped for a batch period before.
            EventBody::Users { joined: vec![ViewId(10)], left: vec![], reset: false },
            // Within the period of the first: batched.
            EventBody::Users { joined: vec![ViewId(20)], left: vec![], reset: false },
            // Right after the previous notice (at 2000): batched until 2200.
            EventBody::Users { joined: vec![ViewId(40)], left: vec![], reset: false },
            EventBody::Users { joined: vec![], left: vec![ViewId(40)], reset: false },
        ]
    );
}

#[test]
fn a_join_after_a_quiet_period_is_stamped_at_once_right_after_the_joiners_sync() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    r.poll(5000);
    sent(&mut r);
    connect_and_join(&mut r, 5000, 2, join(20));
    let out = sent(&mut r);
    // The joiner gets its Sync, then its own view-join as the very next event.
    let to_joiner: Vec<_> = out.iter().filter(|(c, _)| *c == 2).map(|(_, m)| m.clone()).collect();
    let [ServerMessage::Sync(sync), ServerMessage::Event(event)] = to_joiner.as_slice() else {
        panic!("expected the Sync then one event: {to_joiner:?}");
    };
    assert_eq!(event.seq, sync.seq.wrapping_add(1), "the view-join follows the Sync's history");
    assert_eq!(event.time, sync.time);
    assert_eq!(event.body, EventBody::Users { joined: vec![ViewId(20)], left: vec![], reset: false });
    // Every replica sees the same notice at the same stamped time and sequence number.
    assert_eq!(events(&out, 1), vec![event.clone()]);
    assert_eq!(r.next_deadline(), Some(5050), "no batch is left pending (only the tick)");
}

#[test]
fn joins_in_quick_succession_share_a_batch_at_most_one_notice_per_period() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 1000, 1, 10); // stamped at once, at 1000
    let mut out = Vec::new();
    for (client, view, now) in [(2, 20, 1050), (3, 30, 1120)] {
        connect_and_join(&mut r, now, client, join(view));
        out.extend(sent(&mut r));
    }
    assert!(events(&out, 1).is_empty(), "nothing stamped within the period of the previous notice");
    r.poll(1199);
    assert!(events(&sent(&mut r), 1).iter().all(|e| !matches!(e.body, EventBody::Users { .. })));
    r.poll(1200);
    let users: Vec<_> = events(&sent(&mut r), 1).into_iter().map(|e| e.body).collect();
    assert_eq!(users, vec![EventBody::Users { joined: vec![ViewId(20), ViewId(30)], left: vec![], reset: false }]);
    // A join long after the batch is stamped at once again.
    connect_and_join(&mut r, 3000, 4, join(40));
    let out = sent(&mut r);
    let users: Vec<_> = events(&out, 1).into_iter().map(|e| e.body).collect();
    assert_eq!(users, vec![EventBody::Users { joined: vec![ViewId(40)], left: vec![], reset: false }]);
    assert_eq!(events(&out, 1), events(&out, 4), "the joiner sees the notice everyone sees");
}

#[test]
fn a_pending_leave_batch_goes_out_with_an_early_join() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20);
    r.poll(1000); // view 20's join batch
    sent(&mut r);
    r.handle(1300, 2, ClientMessage::Leave);
    r.poll(1300); // the leave is queued: its batch is due at 1500
    connect_and_join(&mut r, 1400, 3, join(30));
    let users: Vec<_> = events(&sent(&mut r), 1).into_iter().map(|e| e.body).collect();
    assert_eq!(users, vec![EventBody::Users { joined: vec![ViewId(30)], left: vec![ViewId(20)], reset: false }]);
    r.poll(1600);
    assert!(events(&sent(&mut r), 1).iter().all(|e| !matches!(e.body, EventBody::Users { .. })));
}

#[test]
fn a_view_that_says_it_leaves_exits_without_the_leave_delay() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 50, 2, 20);
    r.poll(1000);
    sent(&mut r);
    r.handle(1000, 2, ClientMessage::Leave);
    let mut out = Vec::new();
    // After one users batch (200 ms), well inside the 1250 ms leave delay.
    for now in [1100, 1400] {
        r.poll(now);
        out.extend(sent(&mut r));
    }
    let users: Vec<_> =
        events(&out, 1).into_iter().map(|e| e.body).filter(|b| matches!(b, EventBody::Users { .. })).collect();
    assert_eq!(users, vec![EventBody::Users { joined: vec![], left: vec![ViewId(20)], reset: false }]);
    assert!(events(&out, 2).is_empty(), "the leaver is no longer a client of the session");
}

#[test]
fn votes_elect_an_uploader_and_the_snapshot_replaces_the_events_it_covers() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20);
    r.poll(300);
    for _ in 0..5 {
        r.handle(400, 1, ClientMessage::Event(sealed(8).into()));
    }
    // Two join notices (view 10's stamped at once, view 20's batched), then the five events.
    let covered = INITIAL_SEQ.wrapping_add(5);
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
    let record = snapshot(400, covered, [9; 32], sealed(100));
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

/// The clients sent a [`ServerMessage::Consensus`], with the record's time.
fn consensus_sent(out: &[(ClientId, ServerMessage)]) -> Vec<(ClientId, u64)> {
    out.iter()
        .filter_map(|(c, m)| match m {
            ServerMessage::Consensus(record) => Some((*c, record.time)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_dissenting_view_is_sent_the_consensus_snapshot_once_per_divergence() {
    let mut r = Reflector::new(ReflectorConfig::default());
    for (client, view) in [(1, 10), (2, 20), (3, 30)] {
        joined(&mut r, 0, client, view);
    }
    sent(&mut r);
    // At each point, views 10 and 20 agree and view 30 dissents (until the third point).
    let point = |r: &mut Reflector, time: u64, seq: u32, dissent: bool| {
        let theirs = if dissent { [3; 32] } else { [1; 32] };
        for (client, hash) in [(1, [1; 32]), (2, [1; 32]), (3, theirs)] {
            let vote = HashVote { purpose: VotePurpose::Snapshot, time, seq, vote: hash, parts: vec![] };
            r.handle(time, client, ClientMessage::HashVote(vote));
        }
        let before_upload = consensus_sent(&sent(r));
        assert!(before_upload.is_empty(), "nothing to send before the upload: {before_upload:?}");
        r.handle(time + 1, 1, ClientMessage::SnapshotUpload(snapshot(time, seq, [1; 32], sealed(64))));
        consensus_sent(&sent(r))
    };
    assert_eq!(point(&mut r, 100, 1, true), vec![(3, 100)], "the dissenter, and only it, gets the snapshot");
    assert_eq!(point(&mut r, 200, 2, true), vec![], "still diverged: not sent again");
    assert_eq!(point(&mut r, 300, 3, false), vec![], "agrees again (reloaded)");
    assert_eq!(point(&mut r, 400, 4, true), vec![(3, 400)], "a new divergence is told again");
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
    connect(&mut r, 0, 1);
    r.handle(0, 1, ClientMessage::Event(sealed(8).into()));
    assert!(matches!(&sent(&mut r)[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::NotJoined));

    let challenge = connect(&mut r, 0, 2);
    let mut old = join(5);
    old.protocol = 99;
    r.handle(0, 2, signed(&challenge, old));
    assert!(matches!(&sent(&mut r)[..], [(2, ServerMessage::Error(e))] if e.code == ErrorCode::ProtocolVersion));

    joined(&mut r, 0, 3, 30);
    connect_and_join(&mut r, 0, 4, join(30));
    assert!(matches!(&sent(&mut r)[..], [(4, ServerMessage::Error(e))] if e.code == ErrorCode::DuplicateView));

    r.handle(0, 3, ClientMessage::Event(sealed(20_000).into()));
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
        r.handle(1, 1, ClientMessage::Event(sealed(8).into()));
        requested |= events(&sent(&mut r), 1).iter().any(|e| e.body == EventBody::SnapshotRequest);
    }
    assert!(requested);
    r.handle(1, 1, ClientMessage::Event(sealed(8).into()));
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
        r.handle(1400 + i, 1, ClientMessage::Event(sealed(8).into()));
    }
    r.poll(2500);
    let before = sent(&mut r);
    let last = events(&before, 1).last().cloned().unwrap();
    let last_tick = before
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Tick { time, .. } => Some(*time),
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
    // The batch that tells the model who is really there waits for the leave delay (1,250 ms
    // after the first join), to gather every client back within it.
    connect_and_join(&mut r, 120, 3, join(30));
    r.poll(1250);
    assert!(events(&sent(&mut r), 2).is_empty(), "the reset batch is not stamped before the leave delay");
    r.poll(1300);
    let users = events(&sent(&mut r), 2);
    assert_eq!(users[0].body, EventBody::Users { joined: vec![ViewId(20), ViewId(30)], left: vec![], reset: true });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_keys_admit_only_their_app() {
    let mut keys = HashMap::new();
    keys.insert("io.example.test".to_string(), vec!["k1".to_string()]);
    let mut r = Reflector::new(ReflectorConfig { access: AccessControl::ApiKeys(keys), ..Default::default() });
    connect_and_join(&mut r, 0, 1, join(10));
    let out = sent(&mut r);
    assert!(
        matches!(&out[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied && e.message.contains("API key"))
    );
    let challenge = connect(&mut r, 0, 2);
    let mut with_key = join(11);
    with_key.api_key_proof = Some(membership::api_key_proof("k1", &challenge, "io.example.test"));
    r.handle(0, 2, signed(&challenge, with_key.clone()));
    assert!(sent(&mut r).iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Sync(_))));
    // The right key's proof for another connection's challenge: a replay, refused.
    with_key.view_id = ViewId(12);
    let challenge = connect(&mut r, 0, 3);
    r.handle(0, 3, signed(&challenge, with_key.clone()));
    assert!(matches!(&sent(&mut r)[..], [(3, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied));
    // A wrong key's proof: refused.
    let challenge = connect(&mut r, 0, 4);
    with_key.api_key_proof = Some(membership::api_key_proof("k2", &challenge, "io.example.test"));
    r.handle(0, 4, signed(&challenge, with_key));
    assert!(matches!(&sent(&mut r)[..], [(4, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied));
}

#[test]
fn events_beyond_the_rate_limit_are_refused_with_a_reason() {
    let mut r = Reflector::new(ReflectorConfig { max_events_per_second: 10, ..Default::default() });
    joined(&mut r, 0, 1, 10);
    sent(&mut r);
    let mut refused = 0;
    for _ in 0..15 {
        r.handle(100, 1, ClientMessage::Event(sealed(8).into()));
        refused += sent(&mut r)
            .iter()
            .filter(|(_, m)| matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::RateLimited))
            .count();
    }
    assert_eq!(refused, 5);
    // A second later the bucket is full again.
    r.handle(1100, 1, ClientMessage::Event(sealed(8).into()));
    assert!(sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::Event(_))));
}

#[test]
fn every_fresh_start_of_a_session_gets_the_persisted_data_it_started_with() {
    let mut r = Reflector::new(ReflectorConfig::default());
    // Data persisted by an earlier session of the same persistent id.
    joined(&mut r, 0, 1, 10);
    let old = persist_record(0, [1; 32], sealed(10));
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
    let mut new_code = join(20);
    new_code.session_id = SessionId([3; 32]);
    connect_and_join(&mut r, 10, 2, new_code.clone());
    let first = sent(&mut r);
    assert!(first.iter().any(|(c, m)| *c == 2
        && matches!(m, ServerMessage::Sync(s) if s.start == SyncStart::Fresh { persisted: Some(old.clone()), persisted_damaged: None })));
    // ...then persists newer data before any snapshot exists.
    let newer = persist_record(5, [2; 32], sealed(11));
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
    connect_and_join(&mut r, 30, 3, new_code);
    let late = sent(&mut r);
    assert!(
        late.iter().any(|(c, m)| *c == 3
            && matches!(m, ServerMessage::Sync(s) if s.start == SyncStart::Fresh { persisted: Some(old.clone()), persisted_damaged: None })),
        "{late:?}"
    );
}

#[test]
fn a_wrong_password_is_refused_at_join_and_never_reaches_the_session() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    sent(&mut r);
    let intruder = SessionKey::from_master(&[66; 32]);
    let challenge = connect(&mut r, 10, 2);
    r.handle(10, 2, signed_by(&intruder, &challenge, join(20)));
    // Anything it sends after the refused join is ignored by the driver; the core never joined it.
    r.handle(10, 2, ClientMessage::Event(sealed(8).into()));
    r.poll(1000);
    let out = sent(&mut r);
    assert!(
        out.iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::WrongPassword)),
        "{out:?}"
    );
    assert!(!out.iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Sync(_))), "a non-member got a sync");
    let seen = events(&out, 1);
    assert!(seen.iter().all(|e| !matches!(&e.body, EventBody::Users { joined, .. } if joined.contains(&ViewId(20)))));
    assert!(seen.iter().all(|e| !matches!(&e.body, EventBody::View { .. })), "a non-member's event was stamped");
}

#[test]
fn squatting_a_new_session_of_a_pinned_persistent_id_is_refused() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    // A new code version (another session id) of the same persistent id, another password.
    let mut squat = join(20);
    squat.session_id = SessionId([42; 32]);
    let challenge = connect(&mut r, 10, 2);
    r.handle(10, 2, signed_by(&SessionKey::from_master(&[66; 32]), &challenge, squat.clone()));
    assert!(matches!(&sent(&mut r)[..], [(2, ServerMessage::Error(e))] if e.code == ErrorCode::WrongPassword));
    assert_eq!(r.session_count(), 1, "the squatter created no session");
    // The right password still opens it.
    connect_and_join(&mut r, 20, 3, squat);
    assert!(sent(&mut r).iter().any(|(c, m)| *c == 3 && matches!(m, ServerMessage::Sync(_))));
}

#[test]
fn forged_and_replayed_joins_are_refused() {
    let mut r = Reflector::new(ReflectorConfig::default());
    // Forged: the right member key, a signature by another key.
    let challenge = connect(&mut r, 0, 1);
    let ClientMessage::Join(mut forged) = signed_by(&SessionKey::from_master(&[66; 32]), &challenge, join(10)) else {
        unreachable!()
    };
    forged.member_key = key().member_key();
    r.handle(0, 1, ClientMessage::Join(forged));
    assert!(matches!(&sent(&mut r)[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied));
    // Replayed: a genuine join recorded on one connection, sent on another.
    let challenge = connect(&mut r, 0, 2);
    let genuine = signed(&challenge, join(20));
    r.handle(0, 2, genuine.clone());
    assert!(sent(&mut r).iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Sync(_))));
    r.disconnect(10, 2);
    connect(&mut r, 20, 3);
    r.handle(20, 3, genuine);
    assert!(matches!(&sent(&mut r)[..], [(3, ServerMessage::Error(e))] if e.code == ErrorCode::AccessDenied));
}

#[test]
fn uploads_must_carry_a_members_signature() {
    let mut r = Reflector::new(ReflectorConfig::default());
    joined(&mut r, 0, 1, 10);
    r.handle(0, 1, ClientMessage::HashVote(vote(VotePurpose::Persist, 0, INITIAL_SEQ, [1; 32])));
    sent(&mut r);
    // Elected, but the record is signed by another key: not stored.
    let mut record = persist_record(0, [1; 32], sealed(10));
    membership::sign_persist(&SessionKey::from_master(&[66; 32]), &PersistentId([2; 32]), &mut record);
    r.handle(0, 1, ClientMessage::PersistUpload(record));
    assert_eq!(r.persisted(&PersistentId([2; 32])), None);
    assert!(!sent(&mut r).iter().any(|(_, m)| matches!(m, ServerMessage::PersistAccepted { .. })));
    // The genuine one is.
    r.handle(0, 1, ClientMessage::PersistUpload(persist_record(0, [1; 32], sealed(10))));
    assert!(r.persisted(&PersistentId([2; 32])).is_some());
}

fn vote(purpose: VotePurpose, time: u64, seq: u32, hash: [u8; 32]) -> HashVote {
    HashVote { purpose, time, seq, vote: hash, parts: vec![] }
}

#[test]
fn votes_are_metered_and_bounded() {
    let config = ReflectorConfig { max_votes_per_second: 5, max_open_tallies: 3, ..Default::default() };
    let mut r = Reflector::new(config);
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20); // keeps tallies open: it never votes
    sent(&mut r);
    // Votes for points the session has not reached are ignored.
    r.handle(100, 1, ClientMessage::HashVote(vote(VotePurpose::Snapshot, 5_000, 1, [1; 32])));
    // A flood of votes for distinct points: at most 3 tallies open, at most 5 votes a second.
    for i in 0..50 {
        r.handle(100, 1, ClientMessage::HashVote(vote(VotePurpose::Snapshot, i, 1, [1; 32])));
    }
    let session = &r.sessions[&SESSION];
    assert_eq!(session.tallies.len(), 3);
    assert!(session.tallies.keys().all(|(_, time, _)| *time < 5));
    // Oversized votes are ignored even when a decoder let them through.
    let mut big = vote(VotePurpose::Snapshot, 90, 1, [1; 32]);
    big.parts = vec![[0; 32]; r.config.limits.max_vote_parts + 1];
    r.handle(5_000, 1, ClientMessage::HashVote(big));
    assert!(!r.sessions[&SESSION].tallies.keys().any(|(_, time, _)| *time == 90));
}

#[test]
fn sessions_are_capped_overall_and_per_origin() {
    let origin = Some(std::net::IpAddr::from([10, 0, 0, 7]));
    let config = ReflectorConfig { max_sessions: 3, max_sessions_per_origin: 2, ..Default::default() };
    let mut r = Reflector::new(config);
    let open = |r: &mut Reflector, client: ClientId, session: u8, origin| {
        r.connect_from(0, client, origin);
        let challenge = r.clients[&client].challenge;
        r.outputs.clear();
        let mut j = join(client);
        j.session_id = SessionId([session; 32]);
        r.handle(0, client, signed(&challenge, j));
        sent(r)
    };
    assert!(open(&mut r, 1, 1, origin).iter().any(|(_, m)| matches!(m, ServerMessage::Sync(_))));
    assert!(open(&mut r, 2, 2, origin).iter().any(|(_, m)| matches!(m, ServerMessage::Sync(_))));
    let refused = open(&mut r, 3, 3, origin);
    assert!(
        matches!(&refused[..], [(3, ServerMessage::Error(e))] if e.code == ErrorCode::Full && e.message.contains("address"))
    );
    // Joining a session already held is not opening one.
    assert!(open(&mut r, 4, 1, origin).iter().any(|(_, m)| matches!(m, ServerMessage::Sync(_))));
    assert!(open(&mut r, 5, 3, None).iter().any(|(_, m)| matches!(m, ServerMessage::Sync(_))));
    let refused = open(&mut r, 6, 4, None);
    assert!(
        matches!(&refused[..], [(6, ServerMessage::Error(e))] if e.code == ErrorCode::Full && e.message.contains("maximum"))
    );
}

#[test]
fn idle_sessions_are_unloaded_and_come_back_from_storage() {
    let config = ReflectorConfig { idle_unload_ms: 5_000, ..Default::default() };
    let mut r = Reflector::with_storage(config, Box::new(crate::storage::MemoryStorage::default()));
    joined(&mut r, 0, 1, 10);
    r.handle(100, 1, ClientMessage::Event(sealed(1000).into()));
    r.poll(200);
    assert!(r.memory_bytes() >= 1000);
    r.disconnect(300, 1);
    r.poll(2000); // the leave is stamped, the session pauses
    assert_eq!(r.session_count(), 1);
    r.poll(6000);
    assert_eq!(r.session_count(), 1, "not idle long enough yet");
    r.poll(7600);
    assert_eq!(r.session_count(), 0, "unloaded");
    assert_eq!(r.memory_bytes(), 0);
    let sync = joined(&mut r, 8000, 2, 20);
    assert_eq!(sync.events.iter().filter(|e| matches!(e.body, EventBody::View { .. })).count(), 1);
}

#[test]
fn buffered_bytes_and_the_memory_budget_are_bounded() {
    let config = ReflectorConfig {
        max_buffered_bytes: 10_000,
        memory_budget_bytes: 15_000,
        max_events_per_second: 1000,
        ..Default::default()
    };
    let mut r = Reflector::new(config);
    joined(&mut r, 0, 1, 10);
    let mut requested = false;
    let mut refused = 0;
    for _ in 0..20 {
        r.handle(10, 1, ClientMessage::Event(sealed(1000).into()));
        for (_, m) in sent(&mut r) {
            requested |= matches!(&m, ServerMessage::Event(e) if e.body == EventBody::SnapshotRequest);
            refused += usize::from(matches!(&m, ServerMessage::Error(e) if e.code == ErrorCode::BufferFull));
        }
    }
    assert!(requested, "half full: a snapshot is asked for");
    assert!(refused >= 10, "the session's buffer is bounded: {refused} refusals");
    // Another session fills the rest of the budget, then is refused by it.
    let challenge = connect(&mut r, 20, 2);
    let mut other = join(20);
    other.session_id = SessionId([5; 32]);
    r.handle(20, 2, signed(&challenge, other));
    sent(&mut r);
    let mut budget_refusals = 0;
    for _ in 0..20 {
        r.handle(30, 2, ClientMessage::Event(sealed(1000).into()));
        budget_refusals += sent(&mut r)
            .iter()
            .filter(|(_, m)| matches!(m, ServerMessage::Error(e) if e.message.contains("memory budget")))
            .count();
    }
    assert!(budget_refusals > 0);
    assert!(r.memory_bytes() <= 15_000, "{}", r.memory_bytes());
}

fn restart_after(
    dir: &std::path::Path,
    damage: impl FnOnce(&std::path::Path),
) -> (Reflector, Vec<(ClientId, ServerMessage)>) {
    let _ = std::fs::remove_dir_all(dir);
    let storage = || Box::new(crate::storage::DiskStorage::open(dir).unwrap());
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    joined(&mut r, 0, 1, 10);
    r.poll(300);
    for i in 0..20 {
        r.handle(400 + i, 1, ClientMessage::Event(sealed(8).into()));
    }
    r.poll(500);
    // Handing out the outputs records the events (they are recorded before anyone sees them).
    sent(&mut r);
    drop(r);
    damage(&dir.join("sessions").join(SESSION.to_string()).join("events.log"));
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    connect_and_join(&mut r, 1000, 2, join(20));
    let out = sent(&mut r);
    (r, out)
}

#[test]
fn a_session_whose_stored_history_has_a_gap_is_refused_with_a_clear_reason() {
    let dir = std::env::temp_dir().join(format!("synq-core-gap-{}", std::process::id()));
    let (_, out) = restart_after(&dir, |log| {
        let mut bytes = std::fs::read(log).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(log, bytes).unwrap();
    });
    assert!(
        matches!(&out[..], [(2, ServerMessage::Error(e))] if e.code == ErrorCode::Unavailable && e.message.contains("missing") && !e.message.contains('/')),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_session_that_lost_part_of_its_log_says_so_to_its_clients() {
    let dir = std::env::temp_dir().join(format!("synq-core-lost-{}", std::process::id()));
    let (_, out) = restart_after(&dir, |log| std::fs::write(log, b"").unwrap());
    assert!(out.iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Sync(_))), "{out:?}");
    assert!(
        out.iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::DataLost)),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_damaged_persisted_document_is_reported_to_every_fresh_start_never_taken_for_no_data() {
    let dir = std::env::temp_dir().join(format!("synq-core-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = || Box::new(crate::storage::DiskStorage::open(&dir).unwrap());
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    joined(&mut r, 0, 1, 10);
    r.handle(0, 1, ClientMessage::HashVote(vote(VotePurpose::Persist, 0, INITIAL_SEQ, [1; 32])));
    r.handle(0, 1, ClientMessage::PersistUpload(persist_record(0, [1; 32], sealed(10))));
    drop(r);
    let file = dir.join("persisted").join(format!("{}.bin", PersistentId([2; 32])));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    let mut new_code = join(20);
    new_code.session_id = SessionId([3; 32]);
    connect_and_join(&mut r, 10, 2, new_code.clone());
    let damaged = |out: &[(ClientId, ServerMessage)], client| {
        out.iter().any(|(c, m)| {
            *c == client
                && matches!(m, ServerMessage::Sync(s) if matches!(&s.start,
                    SyncStart::Fresh { persisted: None, persisted_damaged: Some(reason) } if reason.contains("persisted data") && !reason.contains('/')))
        })
    };
    assert!(damaged(&sent(&mut r), 2));
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "the damaged document was left for the operator");
    // A restart, then a late joiner replaying the session from its start: told the same.
    drop(r);
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    new_code.view_id = ViewId(30);
    connect_and_join(&mut r, 10, 3, new_code);
    assert!(damaged(&sent(&mut r), 3), "a fresh start of the session was told something else");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_event_sent_again_after_a_reconnect_is_stamped_once() {
    use synq_protocol::wire::{SentId, ViewEvent};
    let event =
        |origin, seq| ClientMessage::Event(ViewEvent { sent: Some(SentId { origin, seq }), payload: sealed(8) });
    let dir = std::env::temp_dir().join(format!("synq-core-dedupe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = || Box::new(crate::storage::DiskStorage::open(&dir).unwrap());
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    joined(&mut r, 0, 1, 10);
    sent(&mut r);
    r.handle(10, 1, event(7, 1));
    r.handle(10, 1, event(7, 2));
    r.handle(10, 1, event(7, 2)); // the same again on this connection: ignored
    assert_eq!(events(&sent(&mut r), 1).len(), 2);
    drop(r); // a restart: what was stamped is known from the log
    let mut r = Reflector::with_storage(ReflectorConfig::default(), storage());
    let mut rejoin = join(10);
    rejoin.resume_after = Some(INITIAL_SEQ);
    connect_and_join(&mut r, 100, 2, rejoin);
    sent(&mut r);
    for seq in 1..=3 {
        r.handle(110, 2, event(7, seq)); // 1 and 2 again, then a new one
    }
    r.handle(110, 2, event(8, 1)); // another instance of the client (a restarted app)
    let stamped = events(&sent(&mut r), 2);
    let ids: Vec<_> = stamped
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::View { sent: Some(id), .. } => Some((id.origin, id.seq)),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![(7, 3), (8, 1)]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_lost_first_event_is_a_gap_and_an_absurd_held_time_is_refused() {
    let dir = std::env::temp_dir().join(format!("synq-core-first-{}", std::process::id()));
    // The first record of the log damaged: storage cannot tell an event is missing (no snapshot
    // says where the history began), the core can.
    let (_, out) = restart_after(&dir, |log| {
        let mut bytes = std::fs::read(log).unwrap();
        // Records follow the 8-byte header: length (u32 LE), 8-byte checksum, body. Clock marks
        // are a few bytes long; the first longer record is the first event.
        let mut at = 8;
        loop {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            if len > 10 {
                bytes[at + 12 + len / 2] ^= 0x80;
                break;
            }
            at += 12 + len;
        }
        std::fs::write(log, bytes).unwrap();
    });
    assert!(
        out.iter().any(|(c, m)| *c == 2 && matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::Unavailable)),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let mut r = Reflector::new(ReflectorConfig::default());
    let mut absurd = join(10);
    absurd.resume_after = Some(5);
    absurd.held_time = u64::MAX;
    connect_and_join(&mut r, 0, 1, absurd);
    assert!(matches!(&sent(&mut r)[..], [(1, ServerMessage::Error(e))] if e.code == ErrorCode::Malformed));
}

/// Memory storage a test watches and steers: shared with other reflectors in the test's
/// imagination (`others` names the sessions they serve, `lost` the claims to report lost at the
/// next renewal); `appends` records how many events each append call carried, `marks` every clock
/// mark; while `refuse` is set, appends fail.
#[derive(Default)]
struct ObservedStorage {
    inner: crate::storage::MemoryStorage,
    others: std::sync::Arc<std::sync::Mutex<HashMap<SessionId, std::net::SocketAddr>>>,
    lost: std::sync::Arc<std::sync::Mutex<Vec<SessionId>>>,
    appends: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    marks: std::sync::Arc<std::sync::Mutex<Vec<SessionTime>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Storage for ObservedStorage {
    fn claim(&mut self, session: &SessionId) -> Result<Claim, StorageError> {
        Ok(self.others.lock().unwrap().get(session).map_or(Claim::Owned, |&addr| Claim::ServedBy(addr)))
    }
    fn renew_claims(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut *self.lost.lock().unwrap())
    }
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        self.inner.load_session(session)
    }
    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        self.inner.create_session(session, meta)
    }
    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError> {
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StorageError::Unavailable { action: "appending events", reason: "refused by the test".into() });
        }
        self.appends.lock().unwrap().push(events.len());
        self.inner.append_events(session, events)
    }
    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError> {
        self.marks.lock().unwrap().push(time);
        self.inner.mark_time(session, time)
    }
    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError> {
        self.inner.store_snapshot(session, snapshot, remaining)
    }
    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        self.inner.load_persisted(persistent_id)
    }
    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError> {
        self.inner.store_persisted(persistent_id, record)
    }
    fn load_member_key(&mut self, persistent_id: &PersistentId) -> Result<Option<[u8; 32]>, StorageError> {
        self.inner.load_member_key(persistent_id)
    }
    fn pin_member_key(&mut self, persistent_id: &PersistentId, key: &[u8; 32]) -> Result<(), StorageError> {
        self.inner.pin_member_key(persistent_id, key)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.inner.sync()
    }
}

#[test]
fn a_session_served_by_another_reflector_redirects_and_a_lost_claim_closes_its_clients() {
    let storage = ObservedStorage::default();
    let (others, lost) = (storage.others.clone(), storage.lost.clone());
    let mut r = Reflector::with_storage(ReflectorConfig::default(), Box::new(storage));
    connect_and_join(&mut r, 0, 1, join(10));
    connect_and_join(&mut r, 0, 2, join(20));
    let out = sent(&mut r);
    assert!(out.iter().filter(|(_, m)| matches!(m, ServerMessage::Sync(_))).count() == 2, "both joined: {out:?}");

    // Another reflector took the session over: this one stops serving it and closes its clients.
    let owner: std::net::SocketAddr = "10.1.2.3:5800".parse().unwrap();
    others.lock().unwrap().insert(SESSION, owner);
    lost.lock().unwrap().push(SESSION);
    r.poll(100);
    let out = sent(&mut r);
    for client in [1, 2] {
        assert!(
            out.iter()
                .any(|(c, m)| *c == client && matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::Unavailable)),
            "client {client} was closed: {out:?}"
        );
    }
    assert!(!r.sessions.contains_key(&SESSION), "the session is no longer held");
    r.disconnect(100, 1);
    r.disconnect(100, 2);

    // Coming back, a client is sent to the session's reflector, and nothing is loaded here.
    connect_and_join(&mut r, 200, 3, join(10));
    let out = sent(&mut r);
    assert_eq!(out[0], (3, ServerMessage::Redirect(owner)));
    assert!(
        matches!(&out[1], (3, ServerMessage::Error(e)) if e.code == ErrorCode::Unavailable && e.message.contains("10.1.2.3:5800"))
    );
    assert_eq!(out.len(), 2);
    assert!(!r.sessions.contains_key(&SESSION));
    r.poll(10_000);
    assert!(events(&sent(&mut r), 3).is_empty(), "nothing is stamped for a session served elsewhere");
}

#[test]
fn events_are_recorded_in_one_batch_per_session_before_anything_carrying_them_leaves() {
    let storage = ObservedStorage::default();
    let appends = storage.appends.clone();
    let mut r = Reflector::with_storage(ReflectorConfig::default(), Box::new(storage));
    joined(&mut r, 0, 1, 10);
    r.poll(300);
    sent(&mut r);
    appends.lock().unwrap().clear();
    for i in 0..5 {
        r.handle(400 + i, 1, ClientMessage::Event(sealed(8).into()));
    }
    assert!(appends.lock().unwrap().is_empty(), "nothing is recorded before outputs are handed out");
    let out = sent(&mut r);
    assert_eq!(*appends.lock().unwrap(), [5], "the five events were recorded in one append");
    assert_eq!(events(&out, 1).len(), 5);
}

#[test]
fn events_storage_refuses_never_leave_and_their_session_is_failed() {
    let storage = ObservedStorage::default();
    let refuse = storage.refuse.clone();
    let mut r = Reflector::with_storage(ReflectorConfig::default(), Box::new(storage));
    joined(&mut r, 0, 1, 10);
    joined(&mut r, 0, 2, 20);
    r.poll(300);
    sent(&mut r);
    r.handle(400, 1, ClientMessage::Event(sealed(8).into()));
    let recorded = events(&sent(&mut r), 2);
    assert_eq!(recorded.len(), 1);

    refuse.store(true, std::sync::atomic::Ordering::Relaxed);
    r.handle(500, 1, ClientMessage::Event(sealed(9).into()));
    r.handle(501, 2, ClientMessage::Event(sealed(9).into()));
    let out = sent(&mut r);
    assert!(events(&out, 1).is_empty() && events(&out, 2).is_empty(), "an unrecorded event left: {out:?}");
    for client in [1, 2] {
        assert!(
            out.iter().any(|(c, m)| *c == client && matches!(m, ServerMessage::Error(e) if e.code == ErrorCode::Unavailable && e.message.contains("record"))),
            "client {client} was not sent away: {out:?}"
        );
    }
    assert!(!r.sessions.contains_key(&SESSION), "the failed session is dropped from memory");
    r.disconnect(600, 1);
    r.disconnect(600, 2);

    // Storage works again: a returning client resumes from what it holds, the event it saw.
    refuse.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut back = join(10);
    back.resume_after = Some(recorded[0].seq);
    back.held_time = recorded[0].time;
    connect_and_join(&mut r, 700, 3, back);
    let out = sent(&mut r);
    let sync = out.iter().find_map(|(c, m)| match m {
        ServerMessage::Sync(sync) if *c == 3 => Some(sync.clone()),
        _ => None,
    });
    let sync = sync.unwrap_or_else(|| panic!("no Sync: {out:?}"));
    assert!(matches!(sync.start, SyncStart::Resume), "{:?}", sync.start);
    assert_eq!(sync.seq, recorded[0].seq, "the refused events were never stamped for anyone");
}

#[test]
fn an_idle_session_marks_its_clock_once_a_second_ahead_of_every_tick() {
    let storage = ObservedStorage::default();
    let marks = storage.marks.clone();
    let mut r = Reflector::with_storage(ReflectorConfig::default(), Box::new(storage));
    connect_and_join(&mut r, 0, 1, join(10));
    sent(&mut r);
    let mut latest_tick = 0;
    for now in (5..=10_000).step_by(5) {
        r.poll(now);
        for (_, message) in sent(&mut r) {
            if let ServerMessage::Tick { time, .. } = message {
                // A restart resumes at the latest mark + TIME_MARK_MS: no tick may be later.
                let recorded = marks.lock().unwrap().iter().copied().max().unwrap_or(0);
                assert!(time < recorded + TIME_MARK_MS, "tick at {time} ms, clock recorded up to {recorded} ms");
                latest_tick = time;
            }
        }
    }
    assert!(latest_tick >= 9_950, "ticks flowed: the last at {latest_tick} ms");
    let marks = marks.lock().unwrap().len();
    assert!((10..=12).contains(&marks), "{marks} clock marks in 10 s of an idle session (one a second)");
}
