//! Hard limits that keep every decode and every buffer bounded.

use serde::{Deserialize, Serialize};

/// Size and count limits, shared by clients and the reflector.
///
/// The defaults follow Croquet where it has a figure (16 KiB per event payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest sealed event payload, in bytes.
    pub max_event_bytes: usize,
    /// Largest sealed snapshot, in bytes.
    pub max_snapshot_bytes: usize,
    /// Largest sealed persisted-data document, in bytes.
    pub max_persist_bytes: usize,
    /// Largest encoded frame the codec accepts, in bytes (a `Sync` can carry a snapshot and many
    /// events, so this bounds those too).
    pub max_frame_bytes: usize,
    /// Most events a `Sync` may carry.
    pub max_sync_events: usize,
    /// Most chunks one payload may be split into.
    pub max_chunks: u32,
    /// Most part hashes one vote may carry (one per resource and component type, and a few more).
    pub max_vote_parts: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 16 * 1024,
            max_snapshot_bytes: 64 * 1024 * 1024,
            max_persist_bytes: 4 * 1024 * 1024,
            max_frame_bytes: 256 * 1024 * 1024,
            max_sync_events: 200_000,
            max_chunks: 65_536,
            max_vote_parts: 1024,
        }
    }
}
