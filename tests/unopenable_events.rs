//! What cannot be opened is skipped, identically on every replica: a member whose client sends
//! garbage (a payload that does not open, one sealed for another kind, one that names no known
//! event type) cannot stop the session. Every replica and a late joiner run on with equal hashes,
//! and each reports the skipped events, naming the sender.

mod common;

use bevy_synq::protocol::ViewId;
use bevy_synq::protocol::crypto::{Binding, SealKind, Sealed, SessionKey};
use bevy_synq::protocol::wire::ClientMessage;
use bevy_synq::reflector::inproc::InProcessConnection;
use bevy_synq::{ModelProblem, SynqProblem};
use common::adversarial::{self, with_bot};
use common::{Harness, Problems, test_session};

const HOSTILE_VIEW: ViewId = ViewId(0xBAD);

/// A member's connection that speaks the wire protocol directly.
fn hostile_member(h: &mut Harness) -> (InProcessConnection, SessionKey) {
    let ids = h.client(0).ids();
    let key = SessionKey::derive(&h.session.password, &ids.persistent, h.session.kdf).unwrap();
    let connection = common::member_connection(h, &key, ids.session, ids.persistent, HOSTILE_VIEW);
    (connection, key)
}

fn skipped_from_hostile(problems: &[SynqProblem]) -> usize {
    problems
        .iter()
        .filter(
            |p| matches!(p, SynqProblem::Model(ModelProblem::BadViewEvent { sender, .. }) if *sender == HOSTILE_VIEW),
        )
        .count()
}

#[test]
fn events_that_do_not_open_are_skipped_alike_on_every_replica() {
    let mut session = test_session("garbage");
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, Box::new(|| Box::new(adversarial::model)));
    h.add_client(with_bot(1));
    h.add_client(with_bot(2));
    h.add_client(with_bot(3));
    h.run_rounds(20, 100);
    let (hostile, key) = hostile_member(&mut h);
    let ids = h.client(0).ids();
    let garbage = Sealed { nonce: [9; 24], ciphertext: vec![0x5A; 64] };
    let wrong_kind = key.seal(SealKind::Snapshot, &Binding::Session(ids.session), b"\x00\x00not an event");
    let unknown_type = key.seal(SealKind::Event, &Binding::SessionView(ids.session, HOSTILE_VIEW), &[0xEE, 0x7F, 1]);
    let other_sender = key.seal(SealKind::Event, &Binding::SessionView(ids.session, ViewId(1)), &[0, 0]);
    for payload in [garbage, wrong_kind, unknown_type, other_sender] {
        assert!(hostile.send(ClientMessage::Event(payload.into())));
        h.run_rounds(3, 100);
    }
    h.run_rounds(20, 100);
    let late = h.add_client(with_bot(4));
    h.run_rounds(30, 100);
    h.settle();

    for (i, app) in h.apps.iter_mut().enumerate() {
        let mut problems = app.world_mut().resource_mut::<Problems>();
        // The late joiner started from a snapshot taken after the garbage: it never saw it.
        let expected = if i == late { 0 } else { 4 };
        assert_eq!(skipped_from_hostile(&problems.0), expected, "replica {i}: {:?}", problems.0);
        problems.0.retain(|p| !matches!(p, SynqProblem::Model(ModelProblem::BadViewEvent { .. })));
    }
    assert!(h.assert_converged() > 0, "no shared snapshot point");
    assert!(bevy_synq::SynqStatus::Synced == common::status(&h.apps[late]));
}
