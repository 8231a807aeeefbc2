//! The state of one session inside the reflector.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use synq_protocol::ids::{Hash32, PersistentId, SessionId, ViewId};
use synq_protocol::wire::{EventBody, PersistRecord, SentId, SessionTime, SnapshotRecord, StampedEvent, VotePurpose};

use crate::core::ClientId;

/// Pending join/leave notices, batched into one `Users` event.
#[derive(Default)]
pub(crate) struct UsersBatch {
    pub joined: Vec<ViewId>,
    pub left: Vec<ViewId>,
    pub deadline: Option<u64>,
}

/// Votes collected for one snapshot point.
pub(crate) struct TallyState {
    pub votes: Vec<(ViewId, Hash32, Vec<Hash32>)>,
    pub deadline: u64,
}

/// A snapshot or document the reflector asked a client to upload.
pub(crate) struct AwaitedUpload {
    pub time: SessionTime,
    pub seq: u32,
    pub uploader: ViewId,
    pub vote: Hash32,
    /// The views whose snapshot vote was outside the consensus: each is sent the snapshot when
    /// it arrives ([`ServerMessage::Consensus`](synq_protocol::wire::ServerMessage::Consensus)).
    pub dissenters: Vec<ViewId>,
}

pub(crate) struct Session {
    pub id: SessionId,
    pub persistent_id: PersistentId,
    /// Session time is `base_time + (now - base_now)`; both move when the session resumes after
    /// being empty or after a restart, so that time continues where it stopped.
    pub base_now: u64,
    pub base_time: SessionTime,
    /// Session time at which the session became empty.
    pub paused_at: Option<SessionTime>,
    /// The last sequence number handed out.
    pub seq: u32,
    pub tick_ms: u32,
    /// Reflector clock of the last broadcast (event or tick).
    pub last_broadcast: u64,
    /// The clock mark last recorded in storage: ahead of session time while the session is active.
    pub last_mark: SessionTime,
    /// Bytes of the buffered events (payloads and a fixed overhead each).
    pub buffered_bytes: usize,
    /// Continued from a replica's state, and no snapshot taken since: clients that do not hold
    /// the state cannot join yet.
    pub reseeding: bool,
    /// What storage reported lost when the session was loaded, told to every joiner.
    pub damage: Option<String>,
    /// Where the client that made the reflector open (or load) the session comes from.
    pub opened_by: Option<std::net::IpAddr>,
    /// Reflector clock at which the session was left without clients.
    pub idle_since: Option<u64>,
    /// Why the persisted data this session should have started from was unreadable (damaged).
    pub initial_persisted_damaged: Option<String>,
    /// The persisted data this session started from: every fresh start gets this one.
    pub initial_persisted: Option<PersistRecord>,
    pub snapshot: Option<SnapshotRecord>,
    /// Every event after the snapshot (or since the session started), in order.
    pub events: VecDeque<StampedEvent>,
    /// The views the session's model holds, as this reflector announced them since it loaded the
    /// session (empty after a load until the first join batch, which carries `reset`).
    pub in_model: BTreeSet<ViewId>,
    /// The last event stamped from each view that may send events again ([`SentId`]): an event
    /// sent again after a reconnect is stamped once.
    pub stamped: HashMap<ViewId, SentId>,
    /// Clients that received their `Sync`, in join order.
    pub clients: Vec<(ClientId, ViewId)>,
    pub users: UsersBatch,
    /// Reflector clock at which the latest join/leave notice was stamped.
    pub users_stamped_at: Option<u64>,
    pub reset_pending: bool,
    pub tallies: BTreeMap<(VotePurpose, SessionTime, u32), TallyState>,
    pub awaited_upload: Option<AwaitedUpload>,
    /// The persisted-data upload the reflector asked for.
    pub awaited_persist: Option<AwaitedUpload>,
    /// Vote of the persisted data stored for this session's persistent id.
    pub persisted_vote: Option<Hash32>,
    /// Views sent the consensus snapshot of a point they dissented at, until they vote with the
    /// consensus again: a replica that stays diverged is not sent a snapshot at every point.
    pub told_divergence: BTreeSet<ViewId>,
    /// Views that disconnected, and when they leave unless they come back.
    pub pending_leaves: Vec<(ViewId, u64)>,
    /// Buffered-event count at which the last snapshot request was sent.
    pub requested_at: Option<usize>,
}

impl Session {
    pub fn time(&self, now: u64) -> SessionTime {
        match self.paused_at {
            Some(paused) => paused,
            None => self.base_time.saturating_add(now.saturating_sub(self.base_now)),
        }
    }

    pub fn has_view(&self, view: ViewId) -> bool {
        self.clients.iter().any(|(_, v)| *v == view)
    }

    /// Whether `id` from `view` was stamped already (same sender instance, not a later event).
    pub fn already_stamped(&self, view: ViewId, id: SentId) -> bool {
        self.stamped.get(&view).is_some_and(|last| last.origin == id.origin && id.seq <= last.seq)
    }

    /// Records a stamped event's sender id.
    pub fn note_stamped(&mut self, event: &StampedEvent) {
        if let EventBody::View { sender, sent: Some(id), .. } = &event.body {
            self.stamped.insert(*sender, *id);
        }
    }

    /// Bytes this session holds in memory: buffered events, the snapshot, the initial data.
    pub fn memory_bytes(&self) -> usize {
        self.buffered_bytes
            + self.snapshot.as_ref().map_or(0, |s| s.data.len())
            + self.initial_persisted.as_ref().map_or(0, |p| p.data.len())
    }
}

/// What one buffered event counts against the buffer and memory limits: its payload and a fixed
/// overhead for the rest.
pub(crate) fn event_bytes(event: &StampedEvent) -> usize {
    const OVERHEAD: usize = 64;
    match &event.body {
        EventBody::View { payload, .. } => OVERHEAD + payload.len(),
        EventBody::Users { joined, left, .. } => OVERHEAD + 8 * (joined.len() + left.len()),
        EventBody::SnapshotRequest => OVERHEAD,
    }
}
