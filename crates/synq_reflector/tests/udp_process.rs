//! The `synq-reflector` binary as a real process on loopback UDP, driven by raw renet clients:
//! stamping and broadcast, a malformed client is cut off without harming the session, the round
//! trip the server loop adds, and graceful shutdown on SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use synq_protocol::codec;
use synq_protocol::crypto::Sealed;
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, MemberSignature};
use synq_protocol::wire::{ClientMessage, ErrorCode, EventBody, ServerMessage, StampedEvent};
use synq_reflector::server::OVERLOAD_NOTICE_EVERY;

mod common;
use common::ReflectorProcess;
use common::raw_client::*;

#[test]
fn events_are_stamped_and_broadcast_and_garbage_only_hurts_its_sender() {
    let reflector = ReflectorProcess::start("broadcast", &[]);
    let mut a = RawClient::connect(reflector.addr, 1);
    let mut b = RawClient::connect(reflector.addr, 2);
    a.join(join(1));
    a.wait_for("a's Sync", synced);
    b.join(join(2));
    b.wait_for("b's Sync", synced);

    a.send(&event(b"hello"));
    a.send(&event(b"world"));
    let mut seen = Vec::new();
    for client in [&mut a, &mut b] {
        let hello = client.wait_for("hello", view_event(b"hello"));
        let world = client.wait_for("world", view_event(b"world"));
        assert_eq!(world.seq, hello.seq.wrapping_add(1), "consecutive sequence numbers");
        assert!(world.time >= hello.time);
        assert!(matches!(hello.body, EventBody::View { sender: ViewId(1), .. }));
        seen.push((hello, world));
    }
    assert_eq!(seen[0], seen[1], "both clients got identical stamps");

    // A client that sends garbage, before and after joining, is cut off with `Malformed`.
    let mut garbage = RawClient::connect(reflector.addr, 3);
    garbage.send_raw(b"definitely not a frame".to_vec());
    garbage.wait_for("Malformed", error(ErrorCode::Malformed));
    garbage.wait_disconnected();

    let mut joined_garbage = RawClient::connect(reflector.addr, 4);
    joined_garbage.join(join(4));
    joined_garbage.wait_for("Sync", synced);
    let mut frame = codec::encode_client(&event(b"x"));
    frame.truncate(frame.len() - 3); // right header, truncated body
    joined_garbage.send_raw(frame);
    joined_garbage.wait_for("Malformed", error(ErrorCode::Malformed));
    joined_garbage.wait_disconnected();

    // The session goes on for everyone else.
    b.send(&event(b"again"));
    let again_a = a.wait_for("again", view_event(b"again"));
    let again_b = b.wait_for("again", view_event(b"again"));
    assert_eq!(again_a, again_b);
    assert!(again_a.seq.wrapping_sub(seen[0].1.seq) >= 1);
    assert!(matches!(again_a.body, EventBody::View { sender: ViewId(2), .. }));
    assert!(a.failed.is_none() && b.failed.is_none());
}

/// Round trips of `Ping`/`Pong` through the reflector with a client that never sleeps: the median
/// is what the server loop (its sleep and work) adds on loopback. Prints the figures; asserts only
/// a generous bound, so that a loaded machine does not make it fail.
#[test]
fn ping_round_trip() {
    let mut medians = Vec::new();
    for (name, sleep_us) in [("ping-default", "1000"), ("ping-busy", "0")] {
        let reflector = ReflectorProcess::start(name, &["--idle-sleep-us", sleep_us]);
        let mut client = RawClient::connect(reflector.addr, 10);
        let mut rtts = Vec::new();
        for nonce in 0..200u64 {
            let start = Instant::now();
            client.send(&ClientMessage::Ping(nonce));
            let mut pong = |m: &ServerMessage| matches!(m, ServerMessage::Pong(n) if *n == nonce).then_some(());
            client.wait_for_spinning("Pong", true, &mut pong);
            rtts.push(start.elapsed());
        }
        rtts.sort();
        let (p50, p90, max) = (rtts[rtts.len() / 2], rtts[rtts.len() * 9 / 10], rtts[rtts.len() - 1]);
        println!("idle sleep {sleep_us} µs: ping round trip p50 {p50:?}, p90 {p90:?}, max {max:?}");
        medians.push(p50);
    }
    assert!(medians[0] < Duration::from_millis(50), "median round trip {:?}", medians[0]);
}

#[test]
fn sigterm_tells_clients_and_exits_cleanly() {
    let mut reflector = ReflectorProcess::start("sigterm", &[]);
    let mut client = RawClient::connect(reflector.addr, 20);
    client.join(join(20));
    client.wait_for("Sync", synced);
    let pid = reflector.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(status.success());
    client.wait_for("ShuttingDown", error(ErrorCode::ShuttingDown));
    let deadline = Instant::now() + TIMEOUT;
    let exit = loop {
        if let Some(exit) = reflector.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the reflector did not exit");
        client.pump(); // acknowledge, so the reflector need not wait out its grace period
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(exit.success(), "exit status {exit}");
    client.wait_disconnected();
}

/// A 2 MiB persisted-data upload (client → reflector) and the `Sync` that carries it to the next
/// joiner (reflector → client) cross as single renet messages. (Debug builds encrypt slowly: this
/// takes seconds there, ≈0.3 s per direction for 3 MiB in release.)
#[test]
fn multi_megabyte_frames_cross_in_both_directions() {
    use synq_protocol::wire::{PersistRecord, SyncStart};
    let reflector = ReflectorProcess::start("large", &[]);
    let mut uploader = RawClient::connect(reflector.addr, 30);
    uploader.timeout = Duration::from_secs(60);
    uploader.join(join(30));
    uploader.wait_for("Sync", synced);
    let data: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    // The reflector only accepts the upload it asked for: vote first (alone, so the tally closes
    // at once and elects this client).
    let vote = synq_protocol::wire::HashVote {
        purpose: synq_protocol::wire::VotePurpose::Persist,
        time: 0,
        seq: synq_protocol::INITIAL_SEQ,
        vote: [9; 32],
        parts: vec![],
    };
    uploader.send(&ClientMessage::HashVote(vote));
    uploader.wait_for("Tally", |m| matches!(m, ServerMessage::Tally(t) if t.uploader.is_some()).then_some(()));
    let data_sealed = Sealed { nonce: [4; 24], ciphertext: data.clone() };
    let mut record = PersistRecord { time: 0, vote: [9; 32], data: data_sealed, signature: MemberSignature::EMPTY };
    membership::sign_persist(&key(), &PersistentId([8; 32]), &mut record);
    let start = Instant::now();
    uploader.send(&ClientMessage::PersistUpload(record));
    let mut accepted = |m: &ServerMessage| matches!(m, ServerMessage::PersistAccepted { .. }).then_some(());
    uploader.wait_for("PersistAccepted", &mut accepted);
    let up = start.elapsed();

    let start = Instant::now();
    let mut joiner = RawClient::connect(reflector.addr, 31);
    joiner.timeout = Duration::from_secs(60);
    // A new session of the same persistent id (new model code) starts from the persisted data.
    let mut new_version = join(31);
    new_version.session_id = SessionId([9; 32]);
    joiner.join(new_version);
    let persisted = joiner.wait_for("Sync", |m| match m {
        ServerMessage::Sync(sync) => match &sync.start {
            SyncStart::Fresh { persisted, .. } => Some(persisted.clone()),
            other => panic!("unexpected start {other:?}"),
        },
        _ => None,
    });
    let down = start.elapsed();
    let persisted = persisted.expect("the Sync carries the persisted data");
    assert!(persisted.data.ciphertext == data, "the data arrived intact");
    println!("2 MiB up in {up:?}, down (connect + join + Sync) in {down:?}");
}

/// The view events of `messages` (payload and sequence number), in the order received.
fn view_events(messages: &[ServerMessage]) -> Vec<(u32, Vec<u8>)> {
    messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Event(StampedEvent { seq, body: EventBody::View { payload, .. }, .. }) => {
                Some((*seq, payload.ciphertext.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Admission control: a client whose connection holds a large unacknowledged backlog (it does not
/// read what it is sent) gets its events refused with `RateLimited` before they are stamped, and
/// everything that was stamped still reaches every member, in order.
#[test]
fn events_from_a_backlogged_sender_are_refused_and_nothing_stamped_is_lost() {
    let reflector =
        ReflectorProcess::start("overload", &["--max-sender-backlog-kib=8", "--max-events-per-second=100000"]);
    let mut a = RawClient::connect(reflector.addr, 1);
    let mut b = RawClient::connect(reflector.addr, 2);
    a.join(join(1));
    a.wait_for("a's Sync", synced);
    b.join(join(2));
    b.wait_for("b's Sync", synced);

    // `a` stops reading (so it acknowledges nothing more) and sends 40 events of 1,000 bytes:
    // each admitted one adds its frame to a's own backlog, so after about 8 KiB the rest are refused.
    const SENT: u8 = 40;
    for i in 0..SENT {
        a.send(&event(&[i; 1000]));
    }
    // `b`'s own connection holds a's admitted events until b acknowledges them, so its event
    // can be refused too. It reads, and sends again once a new notice could be given, until its
    // event is stamped: that event marks the end of what was stamped.
    loop {
        b.send(&event(b"end"));
        let stamped = b.wait_for("end or its refusal", |m| match m {
            ServerMessage::Error(e) if e.code == ErrorCode::RateLimited => Some(false),
            m => view_event(b"end")(m).map(|_| true),
        });
        if stamped {
            break;
        }
        b.pump_for(OVERLOAD_NOTICE_EVERY);
    }

    // `a` reads again: renet's resends bring it everything stamped, and the refusal.
    a.wait_for("end", view_event(b"end"));
    let refusals: Vec<&String> = a.received[..]
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Error(e) if e.code == ErrorCode::RateLimited => Some(&e.message),
            _ => None,
        })
        .collect();
    assert!(!refusals.is_empty(), "a was told its events were refused");
    assert!(refusals.iter().all(|m| m.contains("overloaded")), "{refusals:?}");

    let at_a = view_events(&a.received);
    let at_b = view_events(&b.received);
    assert_eq!(at_a, at_b, "every member received every stamped event, in the same order");
    assert!(at_a.windows(2).all(|w| (1..u32::MAX / 2).contains(&w[1].0.wrapping_sub(w[0].0))), "in sequence order");
    let admitted: Vec<u8> = at_a.iter().filter(|(_, p)| p.len() == 1000).map(|(_, p)| p[0]).collect();
    assert!(!admitted.is_empty(), "events were admitted until the backlog built up");
    assert!(admitted.len() < usize::from(SENT), "some events were refused: {admitted:?}");
    assert!(admitted.windows(2).all(|w| w[1] > w[0]), "admitted events keep their order: {admitted:?}");
    let refused = usize::from(SENT) - admitted.len();
    assert!(refusals.len() <= refused, "no more than one notice per refused event: {refusals:?}");
    assert_eq!(at_a.last().map(|(_, p)| p.as_slice()), Some(&b"end"[..]));
    assert!(a.failed.is_none() && b.failed.is_none());
}
