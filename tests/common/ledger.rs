//! A model that records every event it executes, in order, for the tests that kill reflectors:
//! what was acknowledged before must still be there afterwards, once.

use bevy::ecs::system::RunSystemOnce;
use bevy::prelude::*;
use bevy_synq::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::process::{model_resource, run_until};

/// A numbered event from a view.
#[derive(Serialize, Deserialize, Clone)]
pub struct Note(pub u32);

/// Every event, in the order the model executed it: (view, note, model time).
#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct Ledger(pub Vec<(u64, u32, u64)>);

/// Every view that left the model, in order: (view, model time).
#[derive(Resource, Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
pub struct Departures(pub Vec<(u64, u64)>);

/// The model: a [`Ledger`] of every [`Note`], and the [`Departures`].
pub fn model(model: &mut ModelApp) {
    model
        .init_resource::<Ledger>()
        .init_resource::<Departures>()
        .add_view_event::<Note>()
        .add_observer(|note: On<FromView<Note>>, mut ledger: ResMut<Ledger>, time: Res<ModelTime>| {
            ledger.0.push((note.view.0, note.0, time.now_ms()));
        })
        .add_observer(|exit: On<ViewExited>, mut departures: ResMut<Departures>, time: Res<ModelTime>| {
            departures.0.push((exit.view.0, time.now_ms()));
        });
}

/// Publishes `Note(value)` from `app`'s view.
pub fn note(app: &mut App, value: u32) {
    app.world_mut()
        .run_system_once_with(|In(value): In<u32>, mut publish: Publish<Note>| publish.send(Note(value)), value)
        .unwrap();
}

/// How many events `app`'s model executed.
pub fn ledger_len(app: &App) -> usize {
    model_resource::<Ledger>(app).map_or(0, |l| l.0.len())
}

/// Ten notes from each of `a` (numbered from `from`) and `b` (from `1000 + from`); returns the
/// ledger once both executed them, within `timeout`.
pub fn play(a: &mut App, b: &mut App, from: u32, timeout: Duration) -> Ledger {
    let before = ledger_len(a);
    for i in from..from + 10 {
        note(a, i);
        note(b, 1000 + i);
        run_until(&mut [&mut *a, &mut *b], timeout, |_| true);
    }
    run_until(&mut [&mut *a, &mut *b], timeout, |apps| apps.iter().all(|app| ledger_len(app) == before + 20));
    model_resource::<Ledger>(a).unwrap()
}
