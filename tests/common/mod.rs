//! The determinism harness: K headless Bevy apps on one in-process reflector, driven by a virtual
//! clock, with helpers to add late joiners and to compare every replica's state hashes. The
//! harness itself is the library's public one (`bevy_synq::testing`, feature `testing`); this
//! module re-exports it and adds what only this crate's tests need.
#![allow(dead_code)]

pub mod adversarial;
pub mod hostile;
pub mod ledger;
pub mod process;
pub mod sum;

use bevy::prelude::App;
use bevy_synq::prelude::*;
use std::time::{Duration, Instant};

// Not every test uses every helper.
#[allow(unused_imports)]
pub use bevy_synq::testing::{
    Divergences, Harness, Problems, current_hash, hex, model_time, record_divergences, record_problems, status,
    test_session,
};

/// Builds the model plugin for one replica (each replica gets its own instance); any
/// `Fn() -> impl ModelPlugin` does for [`Harness::new`].
pub type ModelFactory = Box<dyn Fn() -> Box<dyn Fn(&mut ModelApp) + Send + Sync>>;

/// A member's raw connection to the harness's reflector, joined to `session` as `view` with `key`:
/// it speaks the wire protocol directly (what a broken or malicious client could send).
pub fn member_connection(
    h: &mut Harness,
    key: &bevy_synq::protocol::crypto::SessionKey,
    session: bevy_synq::protocol::SessionId,
    persistent: bevy_synq::protocol::PersistentId,
    view: ViewId,
) -> bevy_synq::reflector::inproc::InProcessConnection {
    use bevy_synq::protocol::wire::{ClientMessage, ServerMessage};
    let connection = h.reflector.handle().connect();
    h.round(0);
    let challenge = match connection.try_recv().unwrap().as_deref() {
        Some(ServerMessage::Challenge(challenge)) => *challenge,
        other => panic!("expected a challenge, got {other:?}"),
    };
    let join =
        bevy_synq::protocol::membership::member_join(key, &challenge, &h.session.app_id, session, persistent, view);
    assert!(connection.send(ClientMessage::Join(join)));
    h.round(0);
    connection
}

/// Runs frames of every app (real time, 2 ms apart) until `done` holds; fails after `timeout`,
/// naming `what` and every app's status. For apps on a real reflector, where the harness's
/// virtual clock does not apply.
pub fn run_apps_until(apps: &mut [App], what: &str, timeout: Duration, mut done: impl FnMut(&[App]) -> bool) {
    let deadline = Instant::now() + timeout;
    while !done(apps) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            apps.iter().map(|a| a.world().resource::<SynqStatus>().clone()).collect::<Vec<_>>()
        );
        for app in apps.iter_mut() {
            app.update();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
