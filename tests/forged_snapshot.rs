//! A member elected to upload a snapshot cannot hand late joiners another state: a joiner checks
//! that the snapshot it restores hashes to the vote it was stored under, and refuses it otherwise
//! with a clear reason instead of running from it.

mod common;

use bevy_synq::protocol::crypto::{Binding, SealKind, SessionKey};
use bevy_synq::protocol::membership::{self, MemberSignature};
use bevy_synq::protocol::wire::{ClientMessage, HashVote, SnapshotRecord, VotePurpose};
use bevy_synq::protocol::{INITIAL_SEQ, ViewId};
use bevy_synq::{ModelWorld, SynqStatus};
use common::adversarial::{self, with_bot};
use common::{Harness, test_session};

#[test]
fn a_snapshot_that_does_not_match_its_vote_is_refused_by_joiners() {
    // A genuine snapshot of another session of the same model: it would restore without error.
    let mut source = Harness::new(test_session("elsewhere"), Box::new(|| Box::new(adversarial::model)));
    source.add_client(with_bot(1));
    source.run_rounds(20, 100);
    let other_state = source.apps[0].world_mut().resource_mut::<ModelWorld>().capture().unwrap().unwrap();

    // The victim session: a malicious member creates it, votes alone, is elected, uploads it.
    let mut h = Harness::new(test_session("victim"), Box::new(|| Box::new(adversarial::model)));
    let (persistent, session) = bevy_synq::session_ids(&adversarial::model, &h.session).unwrap();
    let key = SessionKey::derive(&h.session.password, &persistent, h.session.kdf).unwrap();
    let member = common::member_connection(&mut h, &key, session, persistent, ViewId(0xE71));
    let vote = key.vote_digest(&[7; 32]); // any vote: it is the member's own
    member.send(ClientMessage::HashVote(HashVote {
        purpose: VotePurpose::Snapshot,
        time: 0,
        seq: INITIAL_SEQ,
        vote,
        parts: vec![],
    }));
    h.round(10);
    let data = key.seal(SealKind::Snapshot, &Binding::Session(session), &other_state);
    let mut record = SnapshotRecord { time: 0, seq: INITIAL_SEQ, vote, data, signature: MemberSignature::EMPTY };
    membership::sign_snapshot(&key, &session, &mut record);
    member.send(ClientMessage::SnapshotUpload(record));
    h.round(10);
    assert!(h.reflector.core().snapshot(&session).is_some(), "the reflector stored the member's upload");

    let joiner = h.add_client(with_bot(2));
    h.run_rounds(5, 100);
    match common::status(&h.apps[joiner]) {
        SynqStatus::Disconnected { reason } => {
            assert!(reason.contains("does not hold the state the replicas voted for"), "unclear: {reason}")
        }
        other => panic!("the joiner ran from a forged snapshot: {other:?}"),
    }
    assert!(h.apps[joiner].world().resource::<ModelWorld>().runtime().is_none());
}
