//! `future(ms)`: messages the model sends to its own future.

use bevy::ecs::system::SystemParam;
use bevy::platform::collections::HashMap;
use bevy::prelude::*;
use serde::Serialize;
use std::any::{TypeId, type_name};

use super::time::{FutureKind, FutureQueue, ModelTime};

/// Identifies a scheduled timer, for [`ModelTimers::cancel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TimerId(u32);

/// The index of each registered timer event type.
#[derive(Resource, Default)]
pub(crate) struct TimerIndex {
    pub by_type: HashMap<TypeId, u16>,
}

/// Schedules model events at a later model time — Croquet's `this.future(ms)`.
///
/// The event is triggered in the model world (handle it with an observer `On<T>`) when model time
/// reaches `now + ms`, before any external message stamped with the same time. Scheduled timers
/// are part of the snapshot, so a late joiner fires them exactly when everyone else does.
/// Register the event type with [`ModelApp::add_timer_event`](crate::ModelApp::add_timer_event).
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Event, Serialize, Deserialize)]
/// struct Expire(ModelId);
///
/// fn fire(mut timers: ModelTimers, mut commands: Commands) {
///     let blast = commands.spawn(Blast).id();
///     # let _ = blast;
///     // …later, when the blast has its ModelId:
///     timers.after(1500, Expire(ModelId::from_raw(7)));
/// }
/// # #[derive(Component, Serialize, Deserialize)] struct Blast;
/// ```
#[derive(SystemParam)]
pub struct ModelTimers<'w> {
    queue: ResMut<'w, FutureQueue>,
    time: Res<'w, ModelTime>,
    index: Res<'w, TimerIndex>,
}

impl ModelTimers<'_> {
    /// Triggers `event` after `ms` milliseconds of model time.
    ///
    /// # Panics
    /// If `T` was not registered with `add_timer_event`: that is a bug in the model code, the
    /// same on every replica.
    pub fn after<T: Event + Serialize>(&mut self, ms: u64, event: T) -> TimerId {
        let Some(&index) = self.index.by_type.get(&TypeId::of::<T>()) else {
            panic!("bevy_synq: timer event {} was not registered with ModelApp::add_timer_event", type_name::<T>());
        };
        let payload = postcard::to_allocvec(&event).expect("timer events must serialize");
        let time = self.time.now_ms + ms;
        TimerId(self.queue.push(time, FutureKind::Timer { event: index, payload }))
    }

    /// Cancels a timer that has not fired yet. Returns whether it was still pending.
    pub fn cancel(&mut self, timer: TimerId) -> bool {
        self.queue.cancel(timer.0)
    }

    /// Number of pending timers and steps.
    pub fn pending(&self) -> usize {
        self.queue.messages.len()
    }
}
