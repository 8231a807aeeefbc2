//! Events between views and the model.
//!
//! * view → model: a view system publishes with [`Publish`](crate::view::Publish); the event
//!   travels through the reflector and every replica triggers [`FromView<T>`] in its model world
//!   at the same model time. Handle it with an observer.
//! * the reflector's join/leave notices become [`ViewJoined`] / [`ViewExited`].
//! * model → view: model systems send with [`ToView<T>`]; after the model has run, each replica
//!   writes them as Bevy messages into its own app, for its view systems to read with
//!   `MessageReader<T>`.
//! * model → model: trigger an `Event` in the model world (`commands.trigger(..)`): synchronous,
//!   deterministic.

use bevy::ecs::system::SystemParam;
use bevy::prelude::*;
use std::any::Any;
use std::marker::PhantomData;
use synq_protocol::ViewId;
use tracing::error;

/// A view event of type `T`, as the model receives it: triggered in the model world on every
/// replica at the same model time.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Fire;
///
/// fn on_fire(fire: On<FromView<Fire>>, ships: Query<(&Ship, &ModelId)>) {
///     for (ship, _) in &ships {
///         if ship.0 == fire.view { /* spawn a blast */ }
///     }
/// }
/// # #[derive(Component, Serialize, Deserialize)] struct Ship(ViewId);
/// ```
#[derive(Event, Debug, Clone)]
pub struct FromView<T: Send + Sync + 'static> {
    /// The view that published it.
    pub view: ViewId,
    /// The event itself.
    pub event: T,
}

impl<T: Send + Sync + 'static> std::ops::Deref for FromView<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.event
    }
}

/// A view joined the session (the reflector's join notice, in model time order).
#[derive(Event, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewJoined {
    /// The view that joined.
    pub view: ViewId,
}

/// A view left the session.
#[derive(Event, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewExited {
    /// The view that left.
    pub view: ViewId,
}

/// Model → view messages waiting to be handed to the app. Not part of the snapshot: they are
/// output, not state.
#[derive(Resource, Default)]
pub(crate) struct ViewOutbox {
    pub messages: Vec<(u16, Box<dyn Any + Send + Sync>)>,
}

/// The index of each model → view message type, for [`ToView`].
#[derive(Resource, Default)]
pub(crate) struct ViewMessageIndex {
    pub by_type: bevy::platform::collections::HashMap<std::any::TypeId, u16>,
}

/// Sends model → view messages of type `T` from a model system. Register `T` with
/// [`ModelApp::add_view_message`](crate::ModelApp::add_view_message).
///
/// While a replica catches up (before it reports `Synced`), these messages are dropped: a late
/// joiner's view should not replay the past.
#[derive(SystemParam)]
pub struct ToView<'w, T: Message> {
    outbox: ResMut<'w, ViewOutbox>,
    index: Res<'w, ViewMessageIndex>,
    marker: PhantomData<fn(T)>,
}

impl<T: Message> ToView<'_, T> {
    /// Queues a message for this replica's views.
    pub fn send(&mut self, message: T) {
        let Some(&index) = self.index.by_type.get(&std::any::TypeId::of::<T>()) else {
            error!(
                "bevy_synq: {} was sent to the view but never registered with ModelApp::add_view_message",
                std::any::type_name::<T>()
            );
            return;
        };
        self.outbox.messages.push((index, Box::new(message)));
    }
}
