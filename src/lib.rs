//! # bevy_synq
//!
//! Croquet/Multisynq-style **replicated computation** for Bevy. Write your game state as a
//! *model* — components, resources, systems and observers in a `World` of its own — and every
//! player's machine runs it bit-identically, stepped only by what a small **reflector** sends:
//! the events views publish, stamped with a session time and a sequence number, and heartbeat
//! ticks. Late joiners resume from a snapshot; replicas compare state hashes at every snapshot
//! point, so a divergence is detected and reported; everything a client contributes is sealed
//! with a key derived from the session password, so the reflector sees only ciphertext.
//!
//! ## Quick start
//!
//! ```
//! use bevy::prelude::*;
//! use bevy_synq::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! // Model state: registered, serializable components and resources.
//! #[derive(Component, Serialize, Deserialize)]
//! struct Counter(u64);
//!
//! // A view → model event.
//! #[derive(Serialize, Deserialize)]
//! struct Bump(u64);
//!
//! fn model(model: &mut ModelApp) {
//!     model
//!         .register_component::<Counter>()
//!         .add_view_event::<Bump>()
//!         // Runs once, when the session starts fresh.
//!         .add_systems(ModelInit, |mut commands: Commands| {
//!             commands.spawn(Counter(0));
//!         })
//!         // Handlers run on every replica at the same model time.
//!         .add_observer(|bump: On<FromView<Bump>>, mut counters: Query<&mut Counter>| {
//!             for mut counter in &mut counters {
//!                 counter.0 += bump.0;
//!             }
//!         });
//! }
//!
//! // View systems read the model and publish events; they cannot write to it.
//! fn view(mut counters: ModelQuery<&Counter>, mut bump: Publish<Bump>) {
//!     for counter in counters.iter() {
//!         if counter.0 < 3 {
//!             bump.send(Bump(1));
//!         }
//!     }
//! }
//!
//! let mut session = SessionConfig::new("io.example.counter", "lobby", "secret");
//! session.kdf = bevy_synq::protocol::crypto::KdfParams::INSECURE_FAST; // tests only
//! let mut app = App::new();
//! app.add_plugins(MinimalPlugins)
//!     .add_plugins(SynqPlugin::new(model, session))
//!     .add_systems(Update, view);
//! app.update();
//! ```
//!
//! ## The rules of the model
//!
//! Model code must be deterministic: see `docs/determinism.md`. In short: use [`ModelTime`] and
//! [`ModelRng`], never the wall clock or `rand`; keep state in registered components and
//! resources; keep `Entity` values only where Bevy's entity mapping reaches them (`#[entities]`
//! fields, relationships such as `ChildOf`: see [`ModelApp::register_component`]) and refer to
//! entities from events and timers by [`ModelId`]; use the portable math in [`math`] for
//! transcendental functions; order systems whose commands interact.
//!
//! ## Sessions at run time
//!
//! [`SynqPlugin::new`] joins a session at startup; [`SynqPlugin::idle`] starts outside any. From
//! any system, [`SynqSession`] joins, leaves and switches sessions; the key derives on a task pool.
//! The connection is the Bevy state [`SynqState`] (`OnEnter(SynqState::Synced)`,
//! `in_state(SynqState::Syncing)`); [`SynqConnection`] holds its details; [`SynqStatus`] is sent
//! as a message at every change.
//!
//! ## How a frame runs
//!
//! In `PreUpdate` ([`SynqSystems::Receive`], [`SynqSystems::Simulate`]) queued joins and leaves
//! are carried out, then the client takes in what the reflector sent and runs the model up to the
//! reflector's latest time; model → view messages are then written as Bevy messages. `Update` is yours: view systems read the model and publish.
//! In `PostUpdate` ([`SynqSystems::Send`]) published events are sealed and sent. See
//! `docs/architecture.md`.
#![deny(missing_docs)]

// The README's and the guides' snippets compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/persistence.md")]
struct PersistenceGuideDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/debugging-desyncs.md")]
struct DebuggingGuideDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/determinism.md")]
struct DeterminismGuideDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/cluster.md")]
struct ClusterGuideDoctests;

mod client;
mod config;
mod debug;
pub mod math;
pub mod model;
mod plugin;
mod session;
pub mod snapshot;
mod status;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod view;

pub use client::{HashRecord, ModelWorld, Outbox, SessionIds, StartKind, SynqClient};
pub use config::{CatchUpBudget, SessionConfig, ShadowCheck};
pub use debug::DebugFlags;
pub use model::*;
pub use plugin::{ReflectorTarget, SynqPlugin, SynqSystems, model_code_hash, session_ids};
#[cfg(feature = "embedded")]
pub use session::EmbeddedReflectorHandle;
pub use session::SynqSession;
pub use status::{
    DivergenceDetected, EntityDifference, MAX_ENTITY_DIFFERENCES, ReloadReport, ShadowMismatch, SynqConnection,
    SynqProblem, SynqState, SynqStatus, is_synced,
};

/// The protocol crate (ids, crypto, wire messages), re-exported.
pub use synq_protocol as protocol;
/// The reflector crate, re-exported (embedded and in-process reflectors; with the `host` feature,
/// the UDP server too).
#[cfg(feature = "embedded")]
pub use synq_reflector as reflector;

/// Everything a model or view usually needs.
pub mod prelude {
    pub use crate::model::{
        FromView, Migrations, ModelApp, ModelEntities, ModelId, ModelInit, ModelPlugin, ModelRng, ModelTime,
        ModelTimers, ModelUpdate, ModelViews, PersistSession, Persisted, TimerId, ToView, ViewExited, ViewJoined,
    };
    pub use crate::view::{
        Model, ModelChangesPlugin, ModelEntityChanged, ModelEntityDespawned, ModelEntitySpawned, ModelQuery, Publish,
    };
    pub use crate::{
        DivergenceDetected, ReflectorTarget, SessionConfig, SynqConnection, SynqPlugin, SynqProblem, SynqSession,
        SynqState, SynqStatus, SynqSystems, is_synced,
    };
    pub use synq_protocol::ViewId;
}
