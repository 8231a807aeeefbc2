//! What the app hears about the session: connection status, divergence, problems.

use bevy::prelude::*;
use synq_protocol::ViewId;

use crate::model::ModelProblem;

/// Where this client stands in its session. Also a resource, kept current.
#[derive(Resource, Message, Clone, Debug, PartialEq)]
pub enum SynqStatus {
    /// Opening a connection to the reflector, waiting for the session's state.
    Connecting,
    /// Restoring the session and executing the backlog; `progress` goes from 0 to 1.
    Syncing {
        /// Fraction of the backlog executed.
        progress: f32,
    },
    /// Caught up: the model runs live, and this client's own view has joined the model.
    Synced,
    /// Not connected; `reason` says why.
    Disconnected {
        /// Why.
        reason: String,
    },
}

impl SynqStatus {
    /// Whether the status is [`SynqStatus::Synced`].
    pub fn is_synced(&self) -> bool {
        matches!(self, SynqStatus::Synced)
    }
}

/// Replicas computed different state hashes at the same snapshot point: the model is not
/// deterministic (see `docs/debugging-desyncs.md`).
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub struct DivergenceDetected {
    /// Model time of the snapshot point.
    pub time: u64,
    /// The last external sequence number before it.
    pub seq: u32,
    /// The groups of replicas that agree with each other; the consensus first.
    pub groups: Vec<Vec<ViewId>>,
    /// Whether this replica is in the consensus group.
    pub in_consensus: bool,
    /// The parts of the model state that differ between the consensus and the other groups, e.g.
    /// `component my_game::Position` or `resource my_game::Score`: where to start looking.
    pub differing: Vec<String>,
}

/// Something went wrong that the app may want to show or act on.
#[derive(Message, Clone, Debug, PartialEq, Eq)]
pub enum SynqProblem {
    /// A problem in the model, the same on every replica.
    Model(ModelProblem),
    /// The reflector refused something this client sent.
    Refused(String),
    /// The reflector lost part of the session's stored history (damaged storage); the session
    /// continues from what it kept.
    DataLost(String),
}

/// A run condition: the session is synced.
pub fn is_synced(status: Option<Res<SynqStatus>>) -> bool {
    status.is_some_and(|s| s.is_synced())
}
