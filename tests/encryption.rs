//! End-to-end encryption at the plugin level: the wrong password is refused with a clear message,
//! and the reflector only ever holds ciphertext.

mod common;

use common::adversarial::{self, with_bot};
use common::{Harness, test_session};

#[test]
fn a_joiner_with_the_wrong_password_is_refused_clearly() {
    let mut h = Harness::new(test_session("secret"), Box::new(|| Box::new(adversarial::model)));
    h.add_client(with_bot(1));
    h.run_rounds(10, 100);
    let mut wrong = test_session("secret");
    wrong.password = "not the password".into();
    let intruder = h.add_client_with(wrong, |_| {});
    h.run_rounds(5, 100);
    match common::status(&h.apps[intruder]) {
        bevy_synq::SynqStatus::Disconnected { reason } => {
            assert!(reason.contains("wrong session password"), "unclear reason: {reason}")
        }
        other => panic!("the intruder is {other:?}"),
    }
    assert!(
        h.apps[intruder].world().resource::<bevy_synq::ModelWorld>().runtime().is_none(),
        "no model for the intruder"
    );
    // The rightful replica is undisturbed.
    h.run_rounds(5, 100);
    assert!(common::status(&h.apps[0]).is_synced());
}

#[test]
fn the_reflector_stores_only_ciphertext() {
    let mut session = test_session("ciphertext");
    session.snapshot_policy.every_ms = 1_000;
    let mut h = Harness::new(session, Box::new(|| Box::new(adversarial::model)));
    h.add_client(with_bot(7));
    h.add_client(with_bot(8));
    h.run_rounds(40, 100);
    let session_id = h.client(0).ids().session;
    let snapshot = h.reflector.core().snapshot(&session_id).expect("a snapshot was uploaded");
    // The plaintext snapshot starts with the format magic; the stored one must not contain it.
    let plain = h.apps[0].world_mut().resource_mut::<bevy_synq::ModelWorld>().capture().unwrap().unwrap();
    assert_eq!(&plain[..8], b"SYNQSNAP");
    assert!(!snapshot.data.ciphertext.windows(8).any(|w| w == b"SYNQSNAP"), "snapshot stored in plaintext");
}
