//! The model: a deterministic Bevy `World` of its own, stepped only by the reflector.

pub(crate) mod app;
pub(crate) mod entity_refs;
pub(crate) mod events;
pub(crate) mod ids;
pub(crate) mod lint;
pub(crate) mod persist;
pub(crate) mod registry;
pub(crate) mod rng;
pub(crate) mod runtime;
pub(crate) mod time;
pub(crate) mod timers;

pub use app::{ModelApp, ModelPlugin};
pub use events::{FromView, ToView, ViewExited, ViewJoined};
pub use ids::{ModelEntities, ModelId};
pub use persist::{
    Migrations, PERSIST_COOL_OFF_MS, PersistError, PersistOutcome, PersistRequest, PersistSession, Persisted,
};
pub use rng::ModelRng;
pub use runtime::{
    ModelProblem, ModelRuntime, ModelViews, RuntimeError, RuntimeOptions, SnapshotPoint, SnapshotPolicy,
};
pub use time::{ModelInit, ModelTime, ModelUpdate};
pub use timers::{ModelTimers, TimerId};
