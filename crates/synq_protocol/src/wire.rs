//! The messages exchanged between a client and the reflector.
//!
//! Everything a client contributes to a session travels as a [`Sealed`] payload that only holders
//! of the session password can open; the reflector adds the metadata it is responsible for (time,
//! sequence number, sender) around it.

use crate::crypto::Sealed;
use crate::ids::{Hash32, PersistentId, SessionId, ViewId};
use crate::membership::{Challenge, MemberKey, MemberSignature};
use serde::{Deserialize, Serialize};

/// Session time: integer milliseconds since the session started, continuing across reflector
/// restarts. The only clock model code ever sees.
pub type SessionTime = u64;

/// Client → reflector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Join a session: the first message of every connection, sent in answer to the reflector's
    /// [`ServerMessage::Challenge`].
    Join(Join),
    /// A view event for the model, to be stamped and broadcast to every client of the session.
    Event(ViewEvent),
    /// This client's keyed hash of its model state at a snapshot point.
    HashVote(HashVote),
    /// The sealed snapshot for a snapshot point, sent by the client the tally elected.
    SnapshotUpload(SnapshotRecord),
    /// The sealed persisted-data document of the session's persistent id.
    PersistUpload(PersistRecord),
    /// Round-trip probe; answered with [`ServerMessage::Pong`].
    Ping(u64),
    /// Leave the session; the connection may then be closed.
    Leave,
}

/// A view event as a client sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewEvent {
    /// Which sending of events this is: a random number per client instance, with `seq`, lets the
    /// reflector and the client recognise an event sent again after a reconnect. `None` for
    /// tools that never resend.
    pub sent: Option<SentId>,
    /// The sealed event.
    pub payload: Sealed,
}

impl From<Sealed> for ViewEvent {
    /// An event that is never sent again (no [`SentId`]).
    fn from(payload: Sealed) -> Self {
        Self { sent: None, payload }
    }
}

/// Identifies a view event across reconnects: the reflector stamps each `(origin, seq)` of a view
/// once, and the sender knows its event was stamped when it sees it come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SentId {
    /// Random per client instance.
    pub origin: u64,
    /// Counts the instance's events from 1, in the order they were published.
    pub seq: u64,
}

/// The first message of a connection: which session, and the proof of membership.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The app id (reverse-DNS style); used for access control.
    pub app_id: String,
    /// Proof of the app's API key, if the reflector requires one:
    /// [`crate::membership::api_key_proof`] over the connection's challenge. The key itself never
    /// travels.
    pub api_key_proof: Option<Hash32>,
    /// The session to join.
    pub session_id: SessionId,
    /// The session's persistent id (for persisted data).
    pub persistent_id: PersistentId,
    /// This client's view id.
    pub view_id: ViewId,
    /// Heartbeat tick period requested by this client; only the client that creates the session
    /// sets it.
    pub tick_ms: u32,
    /// Set when this is a reconnect of a client that has processed every external message up to
    /// and including this sequence number: the reflector then sends only what came after (a
    /// seamless rejoin) when it still has it.
    pub resume_after: Option<u32>,
    /// With `resume_after`: the model time of the state this client holds. A reflector that does
    /// not know the session (it lost its storage, or is another machine) continues it from there.
    pub held_time: u64,
    /// The session password's membership key; the reflector pins it to the persistent id when
    /// the id is first seen and refuses any other.
    pub member_key: MemberKey,
    /// The membership key's signature of [`crate::membership::join_transcript`]: the connection's
    /// challenge and every field above.
    pub signature: MemberSignature,
}

/// What a vote decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VotePurpose {
    /// A snapshot point: the state hashes are compared, and one replica uploads the snapshot.
    Snapshot,
    /// A persist request: the documents are compared, and one replica uploads the document.
    Persist,
}

/// A client's vote at a snapshot point or persist request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashVote {
    /// What the vote is about.
    pub purpose: VotePurpose,
    /// Model time of the snapshot point.
    pub time: SessionTime,
    /// The last external sequence number executed before the snapshot point.
    pub seq: u32,
    /// A keyed hash of the model state (see [`crate::crypto::SessionKey::vote_digest`]): equal
    /// states give equal votes, and the reflector learns nothing else.
    pub vote: Hash32,
    /// Keyed hashes of the parts of the state (runtime state, each resource, the entity ids, each
    /// component type), in an order every replica of the session shares: replicas that diverge
    /// compare them to name what differs. Empty for persist votes.
    pub parts: Vec<Hash32>,
}

/// A sealed snapshot at a snapshot point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Model time of the snapshot point.
    pub time: SessionTime,
    /// The last external sequence number executed before the snapshot point.
    pub seq: u32,
    /// The vote of the state it holds.
    pub vote: Hash32,
    /// The sealed, canonical encoding of the model.
    pub data: Sealed,
    /// The uploader's membership signature of [`crate::membership::snapshot_transcript`].
    pub signature: MemberSignature,
}

/// A sealed persisted-data document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PersistRecord {
    /// Model time at which the model asked for it to be persisted.
    pub time: SessionTime,
    /// Keyed hash of the document.
    pub vote: Hash32,
    /// The sealed canonical-JSON document.
    pub data: Sealed,
    /// The uploader's membership signature of [`crate::membership::persist_transcript`].
    pub signature: MemberSignature,
}

/// Reflector → client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The first message of every connection: what the join's membership proof must sign.
    Challenge(Challenge),
    /// The answer to a join: where the session stands and how to catch up.
    Sync(Sync),
    /// An external message, stamped by the reflector.
    Event(StampedEvent),
    /// A heartbeat: session time advanced with no event.
    ///
    /// Ticks may travel outside the ordered stream of the other messages (the UDP transport sends
    /// them as single unreliable datagrams, see [`crate::udp`]), so each carries the session's last
    /// sequence number when it was sent: every event after `seq` is stamped at `time` or later. A
    /// client that holds every event up to `seq` may advance to `time`; one that does not yet
    /// must ignore the tick (events before `seq` may be earlier than `time`).
    Tick {
        /// Session time when it was sent.
        time: SessionTime,
        /// The last sequence number the session had handed out when it was sent.
        seq: u32,
    },
    /// The result of the hash votes at a snapshot point.
    Tally(Tally),
    /// The reflector stored the snapshot this client uploaded.
    SnapshotAccepted {
        /// Model time of the stored snapshot.
        time: SessionTime,
        /// Its last external sequence number.
        seq: u32,
    },
    /// The reflector stored the persisted data this client uploaded.
    PersistAccepted {
        /// Keyed hash of the stored document.
        vote: Hash32,
    },
    /// The answer to [`ClientMessage::Ping`].
    Pong(u64),
    /// Something went wrong; `code` says whether retrying can help.
    Error(ErrorMessage),
    /// The consensus snapshot of a snapshot point at which this client's vote was outside the
    /// consensus (a [`Tally`] with several groups): sent once the reflector holds it, so that the
    /// client can name the entities its state differs in without reloading. A view is sent one
    /// per divergence, not one per point, until it votes with the consensus again.
    Consensus(SnapshotRecord),
    /// The session is served by another reflector of the same cluster, reached at this address:
    /// the client connects there and joins again. Sent instead of a `Sync`, followed by an
    /// [`ErrorCode::Unavailable`] error that closes the connection.
    Redirect(std::net::SocketAddr),
}

/// The answer to a join.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sync {
    /// Current session time.
    pub time: SessionTime,
    /// The last sequence number handed out so far.
    pub seq: u32,
    /// The session's heartbeat period.
    pub tick_ms: u32,
    /// How the client starts.
    pub start: SyncStart,
    /// Every external message after the starting point, in order.
    pub events: Vec<StampedEvent>,
}

/// Where a joining client starts from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncStart {
    /// A never-seen session: run the model's init, with the persisted data of the persistent id
    /// if there is any.
    Fresh {
        /// The persisted data of the session's persistent id, if any.
        persisted: Option<PersistRecord>,
        /// Set when the reflector holds persisted data for the persistent id but it is damaged:
        /// init runs without it and the model is told why (persisting is then disabled, so the
        /// stored document stays for the operator to restore).
        persisted_damaged: Option<String>,
    },
    /// Restore the latest snapshot.
    Snapshot(SnapshotRecord),
    /// A seamless rejoin: keep the running model; `events` continue right after the sequence
    /// number the client named in [`Join::resume_after`].
    Resume,
}

/// An external message: what the reflector stamped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StampedEvent {
    /// Session time at which the reflector received it.
    pub time: SessionTime,
    /// Its sequence number (wrapping; consecutive within a session).
    pub seq: u32,
    /// What it carries.
    pub body: EventBody,
}

/// The content of an external message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventBody {
    /// A view event, sealed by its sender.
    View {
        /// The sending client's view id (bound into the ciphertext's associated data).
        sender: ViewId,
        /// The sender's id of the event, if it may send it again (see [`SentId`]).
        sent: Option<SentId>,
        /// The sealed event.
        payload: Sealed,
    },
    /// Views joined and left (batched). Exits are processed before joins.
    Users {
        /// Views that joined, in the order they joined.
        joined: Vec<ViewId>,
        /// Views that left.
        left: Vec<ViewId>,
        /// Set on the first batch after the session was loaded with no client connected (a
        /// reflector restart): every view the model remembers that is not in `joined` has left.
        reset: bool,
    },
    /// The reflector needs a snapshot soon (its event buffer is filling up).
    SnapshotRequest,
}

/// The votes at a snapshot point or persist request, grouped by vote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// What the vote was about.
    pub purpose: VotePurpose,
    /// Model time of the snapshot point.
    pub time: SessionTime,
    /// Its last external sequence number.
    pub seq: u32,
    /// One group per distinct vote, the consensus (largest, ties to the smaller vote) first.
    pub groups: Vec<VoteGroup>,
    /// The client asked to upload the snapshot or document, if the reflector wants it.
    pub uploader: Option<ViewId>,
}

/// Replicas that voted the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteGroup {
    /// The shared vote.
    pub vote: Hash32,
    /// The part hashes of the group's first voter (see [`HashVote::parts`]); empty when the tally
    /// has a single group (nothing differs).
    pub parts: Vec<Hash32>,
    /// Who voted it, sorted.
    pub views: Vec<ViewId>,
}

/// An error sent to a client; often followed by a disconnect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

/// Why the reflector refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The client speaks another protocol version. Final.
    ProtocolVersion,
    /// The app is not admitted (missing or wrong key), or the membership proof is invalid. Final.
    AccessDenied,
    /// The session password differs from the one the session's persistent id was first used
    /// with. Final.
    WrongPassword,
    /// A message arrived before `Join`, or a second `Join`. Final.
    NotJoined,
    /// The view id is already connected to this session. Final.
    DuplicateView,
    /// A frame could not be decoded. Final.
    Malformed,
    /// A message exceeded a size limit; it was dropped.
    TooLarge,
    /// The client sends events faster than allowed; the event was dropped.
    RateLimited,
    /// The session's event buffer is full until a snapshot arrives; the event was dropped.
    BufferFull,
    /// The reflector is at its client limit. Retry later.
    Full,
    /// The reflector is shutting down. Retry later.
    ShuttingDown,
    /// The reflector's storage of the session was damaged and part of its history is lost; the
    /// session continues from what was kept. Not final.
    DataLost,
    /// The reflector cannot serve the session right now (its storage failed or holds a damaged
    /// file). Retry later; the reflector's log says more.
    Unavailable,
}

impl ErrorCode {
    /// Whether the client should give up instead of reconnecting.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ErrorCode::ProtocolVersion
                | ErrorCode::AccessDenied
                | ErrorCode::WrongPassword
                | ErrorCode::NotJoined
                | ErrorCode::DuplicateView
                | ErrorCode::Malformed
        )
    }
}
