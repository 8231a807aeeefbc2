//! Where the reflector keeps what it must not lose: per session the latest snapshot, the events
//! since, and the session's clock; per persistent id the persisted data and the pinned membership
//! key.
//!
//! [`Storage`] is the seam: [`MemoryStorage`] keeps nothing across restarts (tests, solo play);
//! [`DiskStorage`] is the embedded default of the `synq-reflector` binary; `JetStreamStorage`
//! (feature `cluster`) keeps sessions in a NATS JetStream cluster, where another reflector can
//! resume them (`synq-reflector --cluster`, see `docs/cluster.md`).
//!
//! The contract below is written for files; `JetStreamStorage` meets it as follows: an append
//! returns once a quorum of the stream's replicas stored it (so [`Storage::sync`] has nothing to
//! do), objects are replaced atomically (a reader gets the old or the new one, digest-checked),
//! records and objects carry a version byte instead of a checksum (JetStream checksums its own
//! storage), and damaged data is left in place as it is, with no copy beside it.
//!
//! Durability contract:
//!
//! - An event is appended before it is broadcast, so an event any client has seen survives a
//!   crash of the reflector process (`kill -9`): the append has reached the operating system.
//!   The event log is fsynced after [`Storage::sync`] (the server calls it every second; the
//!   fsync runs on a thread of its own) when events were appended since the last sync; a power
//!   loss may lose what was appended since the last completed fsync.
//! - Snapshots, session metadata, persisted data and membership keys are written atomically
//!   (temporary file, fsync, rename, fsync of the directory), so a crash leaves the old or the
//!   new version, never a torn one. So is every rewrite of an event log.
//! - The session clock never goes backwards across a restart of the reflector process: storage
//!   keeps the latest time it recorded for a session (events' times and clock marks), through
//!   snapshot writes too, and [`StoredSession::time`] is at least that. A clock mark alone does not
//!   make a log need a sync (an idle session would cost a disk flush a second): after a power
//!   loss the clock may resume from the last synced record, earlier than clients saw, and they
//!   resync from the reflector's state (a reflector that lost history is handled so anyway).
//!
//! Damage rules (a disk, a file system or an operator can damage what was written):
//!
//! - Every file and every log record carries a checksum. A damaged snapshot, metadata,
//!   persisted-data or membership-key file is never loaded and never taken for "no data": it is
//!   reported as [`StorageError::Corrupt`], left in place, and a copy of it is kept beside it
//!   (`<name>.damaged-<checksum>`) for an operator.
//! - A damaged event log loses only what is damaged: damaged records are skipped, the reader
//!   resynchronises at the next intact record, and every intact record is kept. A log with a
//!   damaged header, or with no intact record (cut short, empty or missing while the session's
//!   metadata exists), is damaged too. The damaged file is never truncated or rewritten in
//!   place: a copy is kept beside it, then the recovered content replaces it atomically. What
//!   was lost is reported in [`StoredSession::damage`].
//! - The only damage a crash can cause is a torn tail: the last record of the log cut short at
//!   the end of the file while it was appended, so never acknowledged. It is cut off (by an
//!   atomic rewrite) and logged, not reported as damage.
//! - [`StorageError`]'s `Display` names files, for the server's log; clients get
//!   [`StorageError::public_reason`] and [`StorageDamage`]'s `Display`, which name none.

mod disk;
#[cfg(feature = "cluster")]
mod jetstream;
mod log;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use synq_protocol::ids::{PersistentId, SessionId};
use synq_protocol::seq_le;
use synq_protocol::wire::{PersistRecord, SessionTime, SnapshotRecord, StampedEvent};

pub use disk::DiskStorage;
#[cfg(feature = "cluster")]
pub use jetstream::{
    CLAIM_SUBJECTS, CLAIMS_STREAM, JetStreamOptions, JetStreamStorage, LOG_STREAM, LOG_SUBJECTS, MEMBERS_BUCKET,
    PERSISTED_BUCKET, SESSIONS_BUCKET, SNAPSHOTS_BUCKET,
};

/// A failure of the storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The operating system refused.
    #[error("storage I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A stored file or object is damaged (bad checksum, truncated, undecodable). It was not
    /// loaded; it was left in place, and a file's copy kept beside it.
    #[error("stored {what} {path} is corrupt ({reason}); it was not loaded and was left in place")]
    Corrupt {
        /// The file (for an object of [`JetStreamStorage`], `nats:<bucket>/<key>`).
        path: PathBuf,
        /// What the file holds ("snapshot", "persisted data", …).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A storage service (the NATS JetStream cluster) failed or did not answer in time.
    #[error("storage service failed while {action}: {reason}")]
    Unavailable {
        /// What the storage was doing.
        action: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Another writer already stored an event under this sequence number of the session: two
    /// reflectors serve the session. The event was not stored again.
    #[error("session {session}: another writer already stored event {seq} (two reflectors serve this session)")]
    Conflict {
        /// The session.
        session: String,
        /// The event's sequence number.
        seq: u32,
    },
}

impl StorageError {
    /// What went wrong, for clients: the kind of failure without server paths or OS details.
    pub fn public_reason(&self) -> String {
        match self {
            StorageError::Io { source, .. } => format!("the reflector's storage failed ({})", source.kind()),
            StorageError::Corrupt { what, reason, .. } => format!("the stored {what} is damaged ({reason})"),
            StorageError::Unavailable { .. } => "the reflector's storage is unavailable".to_string(),
            StorageError::Conflict { .. } => "another reflector is serving this session".to_string(),
        }
    }
}

/// What a session needs to be resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The session's persistent id.
    pub persistent_id: PersistentId,
    /// Its heartbeat period.
    pub tick_ms: u32,
    /// The persisted data the session started from (what every fresh start of it must get, even
    /// after newer data was persisted).
    pub initial_persisted: Option<PersistRecord>,
    /// Set when the session was continued from a replica's state (the reflector had lost it):
    /// the sequence number and model time it continued from. Until a snapshot is stored, the
    /// session's start is unknown here and only replicas that hold it may join.
    pub reseeded_from: Option<(u32, SessionTime)>,
    /// Why the persisted data the session should have started from could not be read (it was
    /// damaged): every fresh start of the session is told the same.
    pub initial_persisted_damaged: Option<String>,
}

/// A session as loaded from storage.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSession {
    /// Its metadata.
    pub meta: SessionMeta,
    /// Its latest snapshot.
    pub snapshot: Option<SnapshotRecord>,
    /// Every intact event after the snapshot, in order (events the snapshot covers are left out).
    /// After damage there may be gaps: see [`StorageDamage::missing_seqs`].
    pub events: Vec<StampedEvent>,
    /// The latest session time recorded (the snapshot's, events' and clock marks'). After damage
    /// the lost records may have held a later one.
    pub time: SessionTime,
    /// What the session lost to a damaged event log; `None` if nothing.
    pub damage: Option<StorageDamage>,
}

/// What a session lost to a damaged event log, as found when it was loaded.
///
/// The session's clients must be told: the reflector no longer holds what it names, and the
/// session clock it recorded may be behind what they saw. `Display` describes it without server
/// paths, for clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageDamage {
    /// The log's header was missing or damaged (an empty or missing log's included).
    pub header_damaged: bool,
    /// The log held no intact record: every event and clock mark it held is lost.
    pub log_lost: bool,
    /// Damaged stretches of the log skipped; each held at least one record.
    pub records_skipped: u32,
    /// Bytes skipped (a damaged header's included).
    pub bytes_skipped: u64,
    /// Event sequence numbers missing before or between the recovered events, as inclusive
    /// ranges `(first, last)`, counted from the snapshot's (without a snapshot, from the first
    /// event recovered). Events lost after the last recovered one cannot be named.
    pub missing_seqs: Vec<(u32, u32)>,
}

/// How many missing ranges the description names.
const NAMED_RANGES: usize = 4;

impl fmt::Display for StorageDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.log_lost {
            parts.push("it held no intact record: the events since the latest snapshot are lost".to_string());
        } else if self.header_damaged {
            parts.push("its header was damaged".to_string());
        }
        if self.records_skipped > 0 {
            parts.push(format!(
                "{} damaged stretch(es) of records ({} bytes) were skipped",
                self.records_skipped, self.bytes_skipped
            ));
        }
        if !self.missing_seqs.is_empty() {
            let named: Vec<String> = self
                .missing_seqs
                .iter()
                .take(NAMED_RANGES)
                .map(|&(first, last)| if first == last { format!("{first}") } else { format!("{first}..={last}") })
                .collect();
            let more = self.missing_seqs.len().saturating_sub(NAMED_RANGES);
            let more = if more > 0 { format!(" and {more} more ranges") } else { String::new() };
            parts.push(format!("events with sequence numbers {}{more} are missing", named.join(", ")));
        }
        write!(
            f,
            "the reflector's stored event log of this session was damaged: {}; the session clock it recorded may be \
             behind",
            parts.join("; ")
        )
    }
}

/// The sequence numbers missing between `events`, and before them if they should follow `base`
/// (the snapshot's).
fn missing_seqs(base: Option<u32>, events: &[StampedEvent]) -> Vec<(u32, u32)> {
    let mut missing = Vec::new();
    let mut last = base;
    for event in events {
        if let Some(last) = last {
            let expected = last.wrapping_add(1);
            if event.seq != expected && seq_le(expected, event.seq) {
                missing.push((expected, event.seq.wrapping_sub(1)));
            }
        }
        last = Some(event.seq);
    }
    missing
}

/// Which reflector serves a session, when several share one storage (cluster mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This reflector serves it: it may load, stamp and store the session until
    /// [`Storage::renew_claims`] reports the claim lost.
    Owned,
    /// Another reflector serves it, reached by clients at this address.
    ServedBy(std::net::SocketAddr),
}

/// The reflector's storage backend.
pub trait Storage: Send {
    /// Claims a session for this reflector before it is loaded, unless another reflector sharing
    /// the storage serves it. Storage that only one reflector uses (the default) always grants
    /// it. A claim lasts until [`Storage::unload_session`] or until [`Storage::renew_claims`]
    /// reports it lost.
    fn claim(&mut self, _session: &SessionId) -> Result<Claim, StorageError> {
        Ok(Claim::Owned)
    }
    /// Keeps this reflector's claims alive (called often; renews when due) and returns the
    /// sessions whose claim was lost (it could not be renewed in time, or another reflector took
    /// it over): the reflector must stop serving them at once. Storage that only one reflector
    /// uses loses none.
    fn renew_claims(&mut self) -> Vec<SessionId> {
        Vec::new()
    }
    /// Loads a session, or `None` if it was never stored. A damaged event log is recovered (see
    /// the module documentation) and what was lost reported in [`StoredSession::damage`]; other
    /// damaged files of the session are errors.
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError>;
    /// Records a new session's metadata, or starts a stored session over: its log is replaced and
    /// its snapshot set aside.
    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError>;
    /// Appends events to the session's log. Called before they are broadcast.
    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError>;
    /// Appends the events of several sessions, each as [`Storage::append_events`] would, and
    /// returns each session's result, in order. A backend whose writes are round trips pipelines
    /// them across sessions; by default the sessions are appended one after the other.
    fn append_batches(&mut self, batches: &[(SessionId, Vec<StampedEvent>)]) -> Vec<Result<(), StorageError>> {
        batches.iter().map(|(session, events)| self.append_events(session, events)).collect()
    }
    /// Records that session time reached `time` (so that time continues across restarts).
    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError>;
    /// Replaces the session's snapshot and drops the logged events it covers (`remaining` are the
    /// events after it). The latest time recorded for the session is kept.
    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError>;
    /// Loads the persisted data of a persistent id. A damaged file is an error, never `None`.
    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError>;
    /// Replaces the persisted data of a persistent id.
    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError>;
    /// The membership key pinned to a persistent id (the verifying key of the session password's
    /// signing key pair), if one was pinned. A damaged file is an error, never `None`.
    fn load_member_key(&mut self, persistent_id: &PersistentId) -> Result<Option<[u8; 32]>, StorageError>;
    /// Pins the membership key of a persistent id; written durably before the first member is
    /// admitted.
    fn pin_member_key(&mut self, persistent_id: &PersistentId, key: &[u8; 32]) -> Result<(), StorageError>;
    /// Makes every event appended so far durable (clock marks ride along, see the module
    /// documentation). [`DiskStorage`] does it on a thread of its own and returns at once; a
    /// failure is reported by a later call, and by dropping the storage, which waits for it.
    fn sync(&mut self) -> Result<(), StorageError>;
    /// The reflector unloaded the session from memory: release what is held open for it (its
    /// state stays stored and is loaded again by [`Storage::load_session`]).
    fn unload_session(&mut self, _session: &SessionId) {}
}

/// Keeps everything in memory: nothing survives the process. For tests and solo play.
#[derive(Default)]
pub struct MemoryStorage {
    sessions: HashMap<SessionId, StoredSession>,
    persisted: HashMap<PersistentId, PersistRecord>,
    member_keys: HashMap<PersistentId, [u8; 32]>,
}

impl Storage for MemoryStorage {
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        Ok(self.sessions.get(session).cloned())
    }

    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        let stored = StoredSession { meta: meta.clone(), snapshot: None, events: Vec::new(), time: 0, damage: None };
        self.sessions.insert(*session, stored);
        Ok(())
    }

    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError> {
        if let Some(stored) = self.sessions.get_mut(session) {
            stored.events.extend_from_slice(events);
            if let Some(last) = events.iter().map(|e| e.time).max() {
                stored.time = stored.time.max(last);
            }
        }
        Ok(())
    }

    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError> {
        if let Some(stored) = self.sessions.get_mut(session) {
            stored.time = stored.time.max(time);
        }
        Ok(())
    }

    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError> {
        if let Some(stored) = self.sessions.get_mut(session) {
            stored.snapshot = Some(snapshot.clone());
            stored.events = remaining.to_vec();
            stored.time = stored.time.max(snapshot.time);
        }
        Ok(())
    }

    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        Ok(self.persisted.get(persistent_id).cloned())
    }

    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError> {
        self.persisted.insert(*persistent_id, record.clone());
        Ok(())
    }

    fn load_member_key(&mut self, persistent_id: &PersistentId) -> Result<Option<[u8; 32]>, StorageError> {
        Ok(self.member_keys.get(persistent_id).copied())
    }

    fn pin_member_key(&mut self, persistent_id: &PersistentId, key: &[u8; 32]) -> Result<(), StorageError> {
        self.member_keys.insert(*persistent_id, *key);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synq_protocol::crypto::Sealed;
    use synq_protocol::ids::ViewId;
    use synq_protocol::membership::MemberSignature;
    use synq_protocol::wire::EventBody;

    fn event(seq: u32, time: u64) -> StampedEvent {
        let payload = Sealed { nonce: [seq as u8; 24], ciphertext: vec![seq as u8; 40] };
        StampedEvent { time, seq, body: EventBody::View { sender: ViewId(3), sent: None, payload } }
    }

    const S: SessionId = SessionId([4; 32]);

    #[test]
    fn memory_storage_keeps_the_latest_time_through_a_snapshot() {
        let mut storage = MemoryStorage::default();
        let meta = SessionMeta {
            persistent_id: PersistentId([5; 32]),
            tick_ms: 50,
            initial_persisted: None,
            reseeded_from: None,
            initial_persisted_damaged: None,
        };
        storage.create_session(&S, &meta).unwrap();
        storage.append_events(&S, &[event(1, 2_000)]).unwrap();
        storage.mark_time(&S, 3_014).unwrap();
        let data = Sealed { nonce: [9; 24], ciphertext: vec![9; 8] };
        let snapshot = SnapshotRecord { time: 2_100, seq: 1, vote: [7; 32], data, signature: MemberSignature::EMPTY };
        storage.store_snapshot(&S, &snapshot, &[]).unwrap();
        let stored = storage.load_session(&S).unwrap().unwrap();
        assert_eq!((stored.time, stored.events.len(), stored.damage), (3_014, 0, None));
    }

    #[test]
    fn public_reasons_name_no_paths() {
        let path = PathBuf::from("/srv/synq-data/persisted/secret-id.bin");
        let corrupt =
            StorageError::Corrupt { path: path.clone(), what: "persisted data", reason: "checksum mismatch".into() };
        assert_eq!(corrupt.public_reason(), "the stored persisted data is damaged (checksum mismatch)");
        let io = StorageError::Io { path, source: io::Error::from(io::ErrorKind::PermissionDenied) };
        assert_eq!(io.public_reason(), "the reflector's storage failed (permission denied)");
        for error in [corrupt, io] {
            assert!(error.to_string().contains("/srv/synq-data"), "the server's log names the file: {error}");
            assert!(!error.public_reason().contains('/'), "{}", error.public_reason());
        }
    }

    #[test]
    fn damage_is_described_without_paths() {
        let damage = StorageDamage {
            header_damaged: false,
            log_lost: false,
            records_skipped: 1,
            bytes_skipped: 84,
            missing_seqs: vec![(17, 17), (20, 22)],
        };
        assert_eq!(
            damage.to_string(),
            "the reflector's stored event log of this session was damaged: 1 damaged stretch(es) of records (84 bytes) \
             were skipped; events with sequence numbers 17, 20..=22 are missing; the session clock it recorded may be \
             behind"
        );
        let lost = StorageDamage {
            header_damaged: true,
            log_lost: true,
            records_skipped: 0,
            bytes_skipped: 0,
            missing_seqs: vec![],
        };
        assert!(lost.to_string().contains("no intact record"), "{lost}");
    }
}
