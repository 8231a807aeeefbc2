//! Seamless rejoin: a client whose connection drops and comes back within the rejoin limit keeps
//! its model, its view never leaves the session, and what it published meanwhile is delivered.

mod common;

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use bevy_synq::{StartKind, SynqClient};
use common::adversarial::{self, Input, Player, with_bot};
use common::{Harness, test_session};

fn players(app: &App) -> usize {
    let model = app.world().resource::<bevy_synq::ModelWorld>().runtime().unwrap().world();
    model.try_query::<&Player>().unwrap().iter(model).count()
}

#[test]
fn a_quick_reconnect_is_seamless() {
    let mut h = Harness::new(test_session("rejoin"), Box::new(|| Box::new(adversarial::model)));
    let a = h.add_client(with_bot(1));
    let b = h.add_client(with_bot(2));
    h.run_rounds(30, 100);
    assert_eq!(players(&h.apps[a]), 2);
    for app in &mut h.apps {
        app.world_mut().resource_mut::<adversarial::Bot>().active = false;
    }
    // Let what the bots published go out (the send rate limit runs on the wall clock).
    while h.apps.iter().any(|app| !app.world().resource::<bevy_synq::Outbox>().is_empty()) {
        h.round(50);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    h.run_rounds(5, 100);
    let pokes_before = common::process::model_resource::<adversarial::Stats>(&h.apps[a]).unwrap().pokes;

    h.apps[b].world_mut().resource_mut::<SynqClient>().reconnect();
    // Published while the connection is down: delivered after the rejoin.
    h.apps[b].world_mut().run_system_once(|mut publish: Publish<Input>| publish.send(Input::Poke(1))).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        h.round(50);
        statuses.push(common::status(&h.apps[b]));
    }
    assert!(statuses.iter().all(SynqStatus::is_synced), "the view noticed the rejoin: {statuses:?}");
    let client = h.client(b);
    assert_eq!(client.reconnects(), 1);
    assert_eq!(client.started_from(), Some(StartKind::Resume));

    h.run_rounds(30, 100); // well past the leave delay
    assert_eq!(players(&h.apps[a]), 2, "the view left and came back");
    // The send rate limit runs on the wall clock: give the held event real time to go out.
    let pokes = |h: &Harness| common::process::model_resource::<adversarial::Stats>(&h.apps[a]).unwrap().pokes;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pokes(&h) == pokes_before && std::time::Instant::now() < deadline {
        h.round(50);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    h.run_rounds(10, 50);
    assert_eq!(pokes(&h), pokes_before + 1, "the event published while disconnected was lost (or doubled)");
    h.settle();
    h.assert_converged();
}
