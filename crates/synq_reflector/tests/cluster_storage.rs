//! `JetStreamStorage` against real `nats-server` processes: the behaviours `DiskStorage` is
//! tested for, the fence against a second writer, a NATS node killed with SIGKILL, and a
//! `synq-reflector --cluster` process killed with SIGKILL whose session another one resumes.
#![cfg(feature = "cluster")]

use std::time::{Duration, Instant};

use synq_protocol::crypto::Sealed;
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::MemberSignature;
use synq_protocol::wire::{EventBody, PersistRecord, SnapshotRecord, StampedEvent};
use synq_reflector::storage::{JetStreamOptions, JetStreamStorage, SessionMeta, Storage, StorageError};

mod common;
use common::ReflectorProcess;
use common::nats::{NatsCluster, nats_available};
use common::raw_client::{RawClient, event as client_event, join, view_event};
use synq_protocol::wire::{ServerMessage, SyncStart};

fn sealed(byte: u8) -> Sealed {
    Sealed { nonce: [byte; 24], ciphertext: vec![byte; 40] }
}

fn event(seq: u32, time: u64) -> StampedEvent {
    StampedEvent { time, seq, body: EventBody::View { sender: ViewId(3), sent: None, payload: sealed(seq as u8) } }
}

fn events(seqs: impl IntoIterator<Item = u32>) -> Vec<StampedEvent> {
    seqs.into_iter().map(|seq| event(seq, u64::from(seq) * 10)).collect()
}

fn snapshot(time: u64, seq: u32) -> SnapshotRecord {
    SnapshotRecord { time, seq, vote: [7; 32], data: sealed(9), signature: MemberSignature::EMPTY }
}

const P: PersistentId = PersistentId([5; 32]);

fn meta() -> SessionMeta {
    SessionMeta {
        persistent_id: P,
        tick_ms: 50,
        initial_persisted: None,
        reseeded_from: None,
        initial_persisted_damaged: None,
    }
}

/// An event as a log record: the version byte, then the postcard encoding of the record (variant
/// 0 is an event).
fn log_event(event: &StampedEvent) -> Vec<u8> {
    let mut bytes = vec![1, 0];
    bytes.extend(postcard::to_allocvec(event).unwrap());
    bytes
}

fn connect(cluster: &NatsCluster) -> JetStreamStorage {
    JetStreamStorage::connect(&cluster.urls(), JetStreamOptions::default())
        .unwrap_or_else(|e| panic!("connecting to the NATS cluster: {e}; node0 log: {}", cluster.log(0)))
}

/// A raw NATS client of the cluster, on its own runtime: what an operator or a failure can do
/// to the stored data behind the storage's back.
struct Raw {
    runtime: tokio::runtime::Runtime,
    jetstream: async_nats::jetstream::Context,
}

impl Raw {
    fn connect(cluster: &NatsCluster) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = runtime.block_on(async_nats::connect(cluster.urls()[0].as_str())).unwrap();
        let jetstream = {
            let _runtime = runtime.enter();
            async_nats::jetstream::new(client)
        };
        Self { runtime, jetstream }
    }

    /// Publishes raw bytes to a session's log subject.
    fn publish_log(&self, session: &SessionId, payload: &[u8]) {
        self.runtime.block_on(async {
            let ack = self.jetstream.publish(format!("synq.log.{session}"), payload.to_vec().into()).await.unwrap();
            ack.await.unwrap();
        });
    }

    /// How many replicas a stream has (as configured).
    fn replicas(&self, stream: &str) -> usize {
        self.runtime
            .block_on(async { self.jetstream.get_stream(stream).await.unwrap().cached_info().config.num_replicas })
    }

    /// The index of the node leading a stream (its servers are named `node<k>`).
    fn leader(&self, stream: &str) -> usize {
        self.runtime.block_on(async {
            let mut stream = self.jetstream.get_stream(stream).await.unwrap();
            let info = stream.info().await.unwrap();
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("the stream has a leader");
            leader.trim_start_matches("node").parse().unwrap()
        })
    }

    /// Empties a session's log subject.
    fn purge_log(&self, session: &SessionId) {
        self.runtime.block_on(async {
            let stream = self.jetstream.get_stream("SYNQ_LOG").await.unwrap();
            stream.purge().filter(format!("synq.log.{session}")).await.unwrap();
        });
    }

    /// Replaces an object with raw bytes.
    fn put_object(&self, bucket: &str, key: &str, bytes: &[u8]) {
        self.runtime.block_on(async {
            let store = self.jetstream.get_object_store(bucket).await.unwrap();
            store.put(key, &mut &bytes[..]).await.unwrap();
        });
    }
}

/// The `DiskStorage` behaviours, on a 3-node cluster: each part uses its own session.
#[test]
fn conformance_on_a_three_node_cluster() {
    if !nats_available("conformance_on_a_three_node_cluster") {
        return;
    }
    let cluster = NatsCluster::start("conformance", 3);
    let raw = Raw::connect(&cluster);
    let mut storage = connect(&cluster);
    for stream in ["SYNQ_LOG", "OBJ_SYNQ_SESSIONS", "OBJ_SYNQ_SNAPSHOTS", "OBJ_SYNQ_PERSISTED", "OBJ_SYNQ_MEMBERS"] {
        assert_eq!(raw.replicas(stream), 3, "{stream}");
    }

    // A session survives reconnecting (another process, another reflector).
    let s = SessionId([1; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &[event(1, 10), event(2, 20)]).unwrap();
    storage.store_snapshot(&s, &snapshot(20, 2), &[]).unwrap();
    storage.append_events(&s, &[event(3, 30)]).unwrap();
    storage.mark_time(&s, 75).unwrap();
    let persisted = PersistRecord { time: 5, vote: [8; 32], data: sealed(2), signature: MemberSignature::EMPTY };
    storage.store_persisted(&P, &persisted).unwrap();
    storage.pin_member_key(&P, &[6; 32]).unwrap();
    storage.sync().unwrap();
    drop(storage);
    let mut storage = connect(&cluster);
    let stored = storage.load_session(&s).unwrap().expect("stored");
    assert_eq!(stored.meta, meta());
    assert_eq!(stored.snapshot, Some(snapshot(20, 2)));
    assert_eq!(stored.events, vec![event(3, 30)]);
    assert_eq!(stored.time, 75);
    assert_eq!(stored.damage, None);
    assert_eq!(storage.load_persisted(&P).unwrap(), Some(persisted));
    assert_eq!(storage.load_member_key(&P).unwrap(), Some([6; 32]));
    assert_eq!(storage.load_member_key(&PersistentId([1; 32])).unwrap(), None);
    assert_eq!(storage.load_persisted(&PersistentId([1; 32])).unwrap(), None);
    assert!(storage.load_session(&SessionId([9; 32])).unwrap().is_none());

    // A snapshot keeps the latest recorded time, also when stored by a process that never
    // loaded the session.
    let s = SessionId([2; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &[event(1, 2_000)]).unwrap();
    storage.mark_time(&s, 3_014).unwrap();
    storage.store_snapshot(&s, &snapshot(2_100, 1), &[]).unwrap();
    assert_eq!(connect(&cluster).load_session(&s).unwrap().unwrap().time, 3_014);
    connect(&cluster).mark_time(&s, 4_000).unwrap();
    connect(&cluster).store_snapshot(&s, &snapshot(3_500, 1), &[]).unwrap();
    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    assert_eq!((stored.time, stored.events.len(), stored.damage), (4_000, 0, None));

    // Events after a snapshot: those it covers are dropped, the remaining ones kept, later
    // appends follow them.
    let s = SessionId([3; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &events(1..=5)).unwrap();
    storage.store_snapshot(&s, &snapshot(30, 3), &events(4..=5)).unwrap();
    storage.append_events(&s, &events(6..=7)).unwrap();
    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    assert_eq!(stored.events, events(4..=7));
    assert_eq!((stored.time, stored.damage), (70, None));
    // A snapshot stored, then the log not purged (a crash in between): the events it covers are
    // left out, and the remaining ones, published again before the purge, are served once.
    for seq in [2, 4, 5] {
        raw.publish_log(&s, &log_event(&event(seq, u64::from(seq) * 10)));
    }
    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    assert_eq!(stored.events, events(4..=7));
    assert_eq!((stored.time, stored.damage), (70, None));

    // create_session starts a stored session over: its snapshot set aside, its log replaced,
    // and its sequence numbers free again.
    let s = SessionId([4; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &events(1..=3)).unwrap();
    storage.store_snapshot(&s, &snapshot(30, 3), &[]).unwrap();
    let mut reseeded = meta();
    reseeded.reseeded_from = Some((3, 30));
    storage.create_session(&s, &reseeded).unwrap();
    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    assert_eq!(
        (stored.meta, stored.snapshot, stored.events, stored.time, stored.damage),
        (reseeded, None, vec![], 0, None)
    );
    storage.append_events(&s, &[event(1, 5), event(2, 6)]).unwrap();
    assert_eq!(connect(&cluster).load_session(&s).unwrap().unwrap().events, vec![event(1, 5), event(2, 6)]);

    // A record that does not decode is skipped and reported, the others kept; it is left in
    // place (reported again).
    let s = SessionId([5; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &events(1..=2)).unwrap();
    raw.publish_log(&s, b"\x01\xff\xff\xff garbage");
    storage.append_events(&s, &events(3..=3)).unwrap();
    raw.publish_log(&s, b"\x09 unknown version");
    for _ in 0..2 {
        let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
        assert_eq!(stored.events, events(1..=3));
        let damage = stored.damage.expect("damage reported");
        assert_eq!((damage.records_skipped, damage.log_lost, damage.missing_seqs), (2, false, vec![]));
        assert!(damage.bytes_skipped > 0);
    }

    // Events missing between a snapshot and the log are named.
    let s = SessionId([6; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.store_snapshot(&s, &snapshot(10, 1), &[]).unwrap();
    storage.append_events(&s, &[event(4, 40)]).unwrap();
    let damage = connect(&cluster).load_session(&s).unwrap().unwrap().damage.expect("gap reported");
    assert_eq!(damage.missing_seqs, vec![(2, 3)]);

    // A log emptied behind the storage's back while the metadata exists: lost, reported.
    let s = SessionId([7; 32]);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &events(1..=2)).unwrap();
    raw.purge_log(&s);
    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    let damage = stored.damage.expect("loss reported");
    assert!(damage.log_lost && stored.events.is_empty(), "{damage:?}");

    // Damaged objects are errors, never taken for "no data".
    let s = SessionId([8; 32]);
    storage.create_session(&s, &meta()).unwrap();
    raw.put_object("SYNQ_SNAPSHOTS", &s.to_string(), b"\x01 not a snapshot");
    let error = connect(&cluster).load_session(&s).unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { what: "snapshot", .. }), "{error}");
    assert!(!error.public_reason().contains("SYNQ"), "{}", error.public_reason());
    raw.put_object("SYNQ_SESSIONS", &s.to_string(), b"");
    let error = connect(&cluster).load_session(&s).unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { what: "session metadata", .. }), "{error}");
    let q = PersistentId([9; 32]);
    raw.put_object("SYNQ_PERSISTED", &q.to_string(), b"\x02 from the future");
    let error = storage.load_persisted(&q).unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { what: "persisted data", .. }), "{error}");
    raw.put_object("SYNQ_MEMBERS", &q.to_string(), b"\x01 short");
    let error = storage.load_member_key(&q).unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { what: "membership key", .. }), "{error}");
}

/// Two reflectors writing one session: the second to store a sequence number is refused, and the
/// log keeps the first one's event.
#[test]
fn a_second_writer_of_the_same_seq_is_refused() {
    if !nats_available("a_second_writer_of_the_same_seq_is_refused") {
        return;
    }
    let cluster = NatsCluster::start("fence", 3);
    let s = SessionId([1; 32]);
    let mut first = connect(&cluster);
    let mut second = connect(&cluster);
    first.create_session(&s, &meta()).unwrap();
    first.append_events(&s, &events(1..=3)).unwrap();
    let loaded = second.load_session(&s).unwrap().unwrap();
    assert_eq!(loaded.events, events(1..=3));

    first.append_events(&s, &[event(4, 40)]).unwrap();
    let error = second.append_events(&s, &[event(4, 41)]).unwrap_err();
    assert!(matches!(error, StorageError::Conflict { seq: 4, .. }), "{error}");
    assert_eq!(error.public_reason(), "another reflector is serving this session");
    // Either way round.
    second.append_events(&s, &[event(5, 50)]).unwrap();
    let error = first.append_events(&s, &[event(6, 60), event(5, 51)]).unwrap_err();
    assert!(matches!(error, StorageError::Conflict { seq: 5, .. }), "{error}");
    // Storing the same event again (a retry after a lost acknowledgement) is no conflict.
    first.append_events(&s, &[event(6, 60)]).unwrap();

    let stored = connect(&cluster).load_session(&s).unwrap().unwrap();
    assert_eq!(stored.events, vec![event(1, 10), event(2, 20), event(3, 30), event(4, 40), event(5, 50), event(6, 60)]);
}

/// Runs `operation` until it succeeds (while JetStream elects new leaders after losing a node,
/// requests fail with `StorageError::Unavailable`); returns its result and how many attempts
/// failed.
fn until_ok<T>(what: &str, mut operation: impl FnMut() -> Result<T, StorageError>) -> (T, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match operation() {
            Ok(value) => return (value, failures),
            Err(error @ StorageError::Unavailable { .. }) => {
                assert!(Instant::now() < deadline, "{what} still fails a minute after a node died: {error}");
                eprintln!("{what} failed while the cluster recovers: {error}");
                failures += 1;
            }
            Err(error) => panic!("{what}: {error}"),
        }
    }
}

/// SIGKILL of one of three NATS nodes: with a quorum of two left, appends and loads go on, and
/// nothing acknowledged is lost.
#[test]
fn appends_and_loads_survive_killing_a_nats_node() {
    if !nats_available("appends_and_loads_survive_killing_a_nats_node") {
        return;
    }
    let mut cluster = NatsCluster::start("kill", 3);
    let s = SessionId([1; 32]);
    let mut storage = connect(&cluster);
    storage.create_session(&s, &meta()).unwrap();
    storage.append_events(&s, &events(1..=20)).unwrap();
    storage.store_snapshot(&s, &snapshot(100, 10), &events(11..=20)).unwrap();
    let persisted = PersistRecord { time: 5, vote: [8; 32], data: sealed(2), signature: MemberSignature::EMPTY };
    storage.store_persisted(&P, &persisted).unwrap();

    // The leader of the event log's stream dies; once it is back and caught up, the new leader.
    for round in 0..2 {
        let victim = Raw::connect(&cluster).leader("SYNQ_LOG");
        cluster.kill(victim);
        let base = 21 + round * 20;
        let ((), failures) = until_ok("append", || storage.append_events(&s, &events(base..base + 1)));
        eprintln!("node{victim} (the log's leader) killed: {failures} appends failed before one was stored");
        for seq in base + 1..base + 20 {
            storage.append_events(&s, &events(seq..=seq)).unwrap();
        }
        let (stored, failures) = until_ok("load", || storage.load_session(&s));
        eprintln!("{failures} loads failed before one succeeded");
        let stored = stored.unwrap();
        assert_eq!(stored.snapshot, Some(snapshot(100, 10)));
        assert_eq!(stored.events, events(11..base + 20));
        assert_eq!(stored.damage, None);
        let (loaded, _) = until_ok("load persisted", || storage.load_persisted(&P));
        assert_eq!(loaded, Some(persisted.clone()));
        // A new connection finds the same, through the nodes left.
        let (stored, _) = until_ok("load", || connect(&cluster).load_session(&s));
        assert_eq!(stored.unwrap().events, events(11..base + 20));
        // The node comes back and catches up before the next one dies (R=3 keeps a quorum of
        // two only while at most one node is down).
        cluster.restart(victim);
    }
}

/// Two clients send events through a `synq-reflector --cluster`, which is then killed with
/// SIGKILL; a second reflector process on another port, given the same cluster, serves the
/// session: a client rejoining there with `resume_after` gets every event the first one
/// acknowledged, as it was stamped.
#[test]
fn another_reflector_resumes_a_killed_ones_session() {
    if !nats_available("another_reflector_resumes_a_killed_ones_session") {
        return;
    }
    let cluster = NatsCluster::start("process", 3);
    // The stream and buckets exist before the reflectors start.
    drop(connect(&cluster));
    let ttl = ["--claim-ttl-ms", "1000"];
    let mut first = ReflectorProcess::start_cluster("cluster-first", &cluster.url_list(), &ttl);
    let mut a = RawClient::connect(first.addr, 1);
    a.join(join(1));
    let start = a.wait_for("Sync", |m| match m {
        ServerMessage::Sync(sync) => Some(sync.clone()),
        _ => None,
    });
    let mut b = RawClient::connect(first.addr, 2);
    b.join(join(2));
    b.wait_for("Sync", |m| matches!(m, ServerMessage::Sync(_)).then_some(()));
    let payloads: [&'static [u8]; 6] = [b"a1", b"b1", b"a2", b"b2", b"a3", b"b3"];
    let mut acknowledged = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        let sender = if i % 2 == 0 { &mut a } else { &mut b };
        sender.send(&client_event(payload));
        // Broadcast (its sender sees it) only once stored.
        acknowledged.push(sender.wait_for("the event stamped", view_event(payload)));
    }
    first.assert_alive();
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();

    let second = ReflectorProcess::start_cluster("cluster-second", &cluster.url_list(), &ttl);
    assert_ne!(second.addr, first.addr);
    let last = acknowledged.last().unwrap();
    // Until the killed reflector's claim on the session lapses, the second one sends clients to
    // it; then it takes the session over.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sync = loop {
        let mut rejoining = RawClient::connect(second.addr, 3);
        rejoining.join(synq_protocol::wire::Join { resume_after: Some(start.seq), held_time: start.time, ..join(1) });
        let answer = rejoining.wait_for("Sync or Redirect", |m| match m {
            ServerMessage::Sync(sync) => Some(Ok(sync.clone())),
            ServerMessage::Redirect(to) => Some(Err(*to)),
            _ => None,
        });
        match answer {
            Ok(sync) => break sync,
            Err(to) => assert_eq!(to, first.addr, "sent to the reflector that held the session"),
        }
        assert!(Instant::now() < deadline, "the session was never taken over");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sync.start, SyncStart::Resume, "{sync:?}");
    let mut served = sync.events.iter();
    for event in &acknowledged {
        assert!(served.any(|e| e == event), "{event:?} missing from the resumed session's events {:?}", sync.events);
    }
    assert!(sync.seq >= last.seq && sync.time >= last.time, "{sync:?}");
}

/// A snapshot of about 600 KB (five object store chunks), told apart by `byte`.
fn big_snapshot(byte: u8) -> SnapshotRecord {
    let data = Sealed { nonce: [byte; 24], ciphertext: vec![byte; 600_000] };
    SnapshotRecord { time: u64::from(byte), seq: 0, vote: [byte; 32], data, signature: MemberSignature::EMPTY }
}

/// While one reflector replaces a session's multi-chunk snapshot over and over, another loads
/// the session: it always gets one of the two snapshots whole, never a mix or a torn one.
#[test]
fn readers_get_the_old_or_the_new_snapshot_never_a_mix() {
    if !nats_available("readers_get_the_old_or_the_new_snapshot_never_a_mix") {
        return;
    }
    let cluster = NatsCluster::start("atomic", 3);
    let s = SessionId([1; 32]);
    let mut writer = connect(&cluster);
    writer.create_session(&s, &meta()).unwrap();
    writer.store_snapshot(&s, &big_snapshot(1), &[]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writing = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut puts = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer.store_snapshot(&s, &big_snapshot(if puts.is_multiple_of(2) { 2 } else { 1 }), &[]).unwrap();
                puts += 1;
            }
            puts
        })
    };
    let mut reader = connect(&cluster);
    let mut seen = [0u32; 2];
    for _ in 0..40 {
        let snapshot = reader.load_session(&s).unwrap().unwrap().snapshot.expect("a snapshot");
        let byte = snapshot.vote[0];
        assert!(byte == 1 || byte == 2, "unexpected snapshot {byte}");
        assert_eq!(snapshot, big_snapshot(byte), "a snapshot mixing two versions");
        seen[usize::from(byte - 1)] += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let puts = writing.join().unwrap();
    eprintln!("{puts} snapshot puts while 40 loads saw {seen:?}");
    assert!(puts >= 2, "the writer replaced the snapshot while the reader loaded");
}
