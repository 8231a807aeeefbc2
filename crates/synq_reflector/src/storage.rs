//! Where the reflector keeps what it must not lose: per session the latest snapshot, the events
//! since, and the session's clock; per persistent id the persisted data.
//!
//! [`Storage`] is the seam: [`MemoryStorage`] keeps nothing across restarts (tests, solo play);
//! [`DiskStorage`] is the embedded default of the `synq-reflector` binary. An object store can
//! implement the same trait.
//!
//! Durability contract: an event is appended before it is broadcast, so an event any client has
//! seen survives a crash of the reflector process (`kill -9`): the append has reached the
//! operating system. Snapshots, session metadata and persisted data are written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves the old or the new
//! version, never a torn one. The event log is fsynced on [`Storage::sync`] (the server calls it
//! periodically); a power loss may lose what was appended since.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use synq_protocol::crypto::Sealed;
use synq_protocol::ids::{PersistentId, SessionId, hash_parts};
use synq_protocol::wire::{PersistRecord, SessionTime, SnapshotRecord, StampedEvent};

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
    /// A stored file is damaged (bad checksum, truncated, undecodable). It was not loaded.
    #[error("stored file {path} is corrupt ({reason}); it was not loaded")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// What a session needs to be resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The session's persistent id.
    pub persistent_id: PersistentId,
    /// Its heartbeat period.
    pub tick_ms: u32,
    /// The first client's password check token.
    pub password_check: Sealed,
    /// The persisted data the session started from (what every fresh start of it must get, even
    /// after newer data was persisted).
    pub initial_persisted: Option<PersistRecord>,
}

/// A session as loaded from storage.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSession {
    /// Its metadata.
    pub meta: SessionMeta,
    /// Its latest snapshot.
    pub snapshot: Option<SnapshotRecord>,
    /// Every event after the snapshot, in order.
    pub events: Vec<StampedEvent>,
    /// The latest session time recorded (events and clock marks).
    pub time: SessionTime,
}

/// The reflector's storage backend.
pub trait Storage: Send {
    /// Loads a session, or `None` if it was never stored.
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError>;
    /// Records a new session's metadata.
    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError>;
    /// Appends events to the session's log. Called before they are broadcast.
    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError>;
    /// Records that session time reached `time` (so that time continues across restarts).
    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError>;
    /// Replaces the session's snapshot and drops the logged events it covers (`remaining` are the
    /// events after it).
    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError>;
    /// Loads the persisted data of a persistent id.
    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError>;
    /// Replaces the persisted data of a persistent id.
    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError>;
    /// Makes everything appended so far durable.
    fn sync(&mut self) -> Result<(), StorageError>;
}

/// Keeps everything in memory: nothing survives the process. For tests and solo play.
#[derive(Default)]
pub struct MemoryStorage {
    sessions: HashMap<SessionId, StoredSession>,
    persisted: HashMap<PersistentId, PersistRecord>,
}

impl Storage for MemoryStorage {
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        Ok(self.sessions.get(session).cloned())
    }

    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        self.sessions
            .insert(*session, StoredSession { meta: meta.clone(), snapshot: None, events: Vec::new(), time: 0 });
        Ok(())
    }

    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError> {
        if let Some(stored) = self.sessions.get_mut(session) {
            stored.events.extend_from_slice(events);
            if let Some(last) = events.last() {
                stored.time = stored.time.max(last.time);
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

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// A data directory on local disk.
///
/// ```text
/// <dir>/sessions/<session id>/meta.bin       session metadata          (atomic replace)
/// <dir>/sessions/<session id>/snapshot.bin   latest snapshot           (atomic replace)
/// <dir>/sessions/<session id>/events.log     events since, clock marks (append; rewritten atomically with a snapshot)
/// <dir>/persisted/<persistent id>.bin        persisted data            (atomic replace)
/// ```
///
/// Every file and every log record carries a checksum (the first 8 bytes of SHA-256); a damaged
/// file is reported as [`StorageError::Corrupt`] and not loaded. A damaged *tail* of an event log
/// (a record cut short by a crash while it was being written, so never acknowledged) is reported
/// in the log and cut off.
pub struct DiskStorage {
    root: PathBuf,
    logs: HashMap<SessionId, File>,
}

const FILE_MAGIC: &[u8; 8] = b"SYNQSTR1";

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Event(StampedEvent),
    Mark(SessionTime),
}

/// Log records as written: length (u32 LE), checksum, postcard body — each.
fn encode_records(records: &[LogRecord]) -> Vec<u8> {
    let mut buffer = Vec::new();
    for record in records {
        let body = postcard::to_allocvec(record).expect("log records encode");
        buffer.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&checksum(&body));
        buffer.extend_from_slice(&body);
    }
    buffer
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let hash = hash_parts(&[bytes]);
    hash[..8].try_into().expect("8 bytes")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// Writes `value` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StorageError> {
    let body = postcard::to_allocvec(value).map_err(|e| corrupt(path, format!("cannot encode: {e}")))?;
    let dir = path.parent().expect("storage paths have a parent");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(FILE_MAGIC).map_err(io_err(&tmp))?;
        file.write_all(&checksum(&body)).map_err(io_err(&tmp))?;
        file.write_all(&body).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(())
}

/// Reads a file written by [`write_atomic`]; `None` if it does not exist.
fn read_checked<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StorageError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    if bytes.len() < 16 || &bytes[..8] != FILE_MAGIC {
        return Err(corrupt(path, "missing header (truncated or not a bevy_synq file)"));
    }
    let body = &bytes[16..];
    if bytes[8..16] != checksum(body) {
        return Err(corrupt(path, "checksum mismatch"));
    }
    postcard::from_bytes(body).map(Some).map_err(|e| corrupt(path, format!("undecodable: {e}")))
}

impl DiskStorage {
    /// Opens (creating if needed) a data directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        for dir in [root.join("sessions"), root.join("persisted")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(Self { root, logs: HashMap::new() })
    }

    fn session_dir(&self, session: &SessionId) -> PathBuf {
        self.root.join("sessions").join(session.to_string())
    }

    fn log(&mut self, session: &SessionId) -> Result<&mut File, StorageError> {
        if !self.logs.contains_key(session) {
            let path = self.session_dir(session).join("events.log");
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
            self.logs.insert(*session, file);
        }
        Ok(self.logs.get_mut(session).expect("inserted above"))
    }

    fn append(&mut self, session: &SessionId, records: &[LogRecord]) -> Result<(), StorageError> {
        let buffer = encode_records(records);
        let path = self.session_dir(session).join("events.log");
        self.log(session)?.write_all(&buffer).map_err(io_err(&path))
    }

    /// Reads a log, cutting off a damaged tail.
    fn read_log(path: &Path) -> Result<(Vec<StampedEvent>, SessionTime), StorageError> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes).map_err(io_err(path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(io_err(path)(e)),
        }
        let (mut events, mut time, mut at) = (Vec::new(), 0, 0usize);
        while at < bytes.len() {
            let good = (|| {
                let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
                let sum = bytes.get(at + 4..at + 12)?;
                let body = bytes.get(at + 12..at + 12 + len)?;
                (sum == checksum(body))
                    .then(|| postcard::from_bytes::<LogRecord>(body).ok())
                    .flatten()
                    .map(|r| (r, 12 + len))
            })();
            match good {
                Some((LogRecord::Event(event), used)) => {
                    time = time.max(event.time);
                    events.push(event);
                    at += used;
                }
                Some((LogRecord::Mark(mark), used)) => {
                    time = time.max(mark);
                    at += used;
                }
                None => {
                    tracing::warn!(path = %path.display(), offset = at, dropped = bytes.len() - at, "damaged tail of an event log cut off");
                    let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
                    file.set_len(at as u64).map_err(io_err(path))?;
                    break;
                }
            }
        }
        Ok((events, time))
    }
}

impl Storage for DiskStorage {
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        let dir = self.session_dir(session);
        let Some(meta) = read_checked::<SessionMeta>(&dir.join("meta.bin"))? else { return Ok(None) };
        let snapshot = read_checked::<SnapshotRecord>(&dir.join("snapshot.bin"))?;
        let (events, logged) = Self::read_log(&dir.join("events.log"))?;
        let time = logged.max(snapshot.as_ref().map_or(0, |s| s.time));
        Ok(Some(StoredSession { meta, snapshot, events, time }))
    }

    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        write_atomic(&self.session_dir(session).join("meta.bin"), meta)
    }

    fn append_events(&mut self, session: &SessionId, events: &[StampedEvent]) -> Result<(), StorageError> {
        let records: Vec<LogRecord> = events.iter().cloned().map(LogRecord::Event).collect();
        self.append(session, &records)
    }

    fn mark_time(&mut self, session: &SessionId, time: SessionTime) -> Result<(), StorageError> {
        self.append(session, &[LogRecord::Mark(time)])
    }

    fn store_snapshot(
        &mut self,
        session: &SessionId,
        snapshot: &SnapshotRecord,
        remaining: &[StampedEvent],
    ) -> Result<(), StorageError> {
        let dir = self.session_dir(session);
        write_atomic(&dir.join("snapshot.bin"), snapshot)?;
        // Rewrite the log with only what the snapshot does not cover.
        self.logs.remove(session);
        let tmp = dir.join("events.log.tmp");
        {
            let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
            let records: Vec<LogRecord> =
                remaining.iter().cloned().map(LogRecord::Event).chain([LogRecord::Mark(snapshot.time)]).collect();
            file.write_all(&encode_records(&records)).map_err(io_err(&tmp))?;
            file.sync_all().map_err(io_err(&tmp))?;
        }
        let log = dir.join("events.log");
        fs::rename(&tmp, &log).map_err(io_err(&log))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
        Ok(())
    }

    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        read_checked(&self.root.join("persisted").join(format!("{persistent_id}.bin")))
    }

    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError> {
        write_atomic(&self.root.join("persisted").join(format!("{persistent_id}.bin")), record)
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        for (session, file) in &self.logs {
            file.sync_data().map_err(|source| StorageError::Io { path: PathBuf::from(session.to_string()), source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synq_protocol::ids::ViewId;
    use synq_protocol::wire::EventBody;

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "synq-storage-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn sealed(byte: u8) -> Sealed {
        Sealed { nonce: [byte; 24], ciphertext: vec![byte; 40] }
    }

    fn event(seq: u32, time: u64) -> StampedEvent {
        StampedEvent { time, seq, body: EventBody::View { sender: ViewId(3), payload: sealed(seq as u8) } }
    }

    const S: SessionId = SessionId([4; 32]);

    fn meta() -> SessionMeta {
        SessionMeta {
            persistent_id: PersistentId([5; 32]),
            tick_ms: 50,
            password_check: sealed(1),
            initial_persisted: None,
        }
    }

    #[test]
    fn a_session_survives_reopening_the_directory() {
        let dir = temp_dir("reopen");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        storage.append_events(&S, &[event(1, 10), event(2, 20)]).unwrap();
        let snapshot = SnapshotRecord { time: 20, seq: 2, vote: [7; 32], data: sealed(9) };
        storage.store_snapshot(&S, &snapshot, &[]).unwrap();
        storage.append_events(&S, &[event(3, 30)]).unwrap();
        storage.mark_time(&S, 75).unwrap();
        let persisted = PersistRecord { time: 5, vote: [8; 32], data: sealed(2) };
        storage.store_persisted(&PersistentId([5; 32]), &persisted).unwrap();
        drop(storage);

        let mut storage = DiskStorage::open(&dir).unwrap();
        let stored = storage.load_session(&S).unwrap().expect("stored");
        assert_eq!(stored.meta, meta());
        assert_eq!(stored.snapshot, Some(snapshot));
        assert_eq!(stored.events, vec![event(3, 30)]);
        assert_eq!(stored.time, 75);
        assert_eq!(storage.load_persisted(&PersistentId([5; 32])).unwrap(), Some(persisted));
        assert!(storage.load_session(&SessionId([9; 32])).unwrap().is_none());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_file_is_reported_not_loaded() {
        let dir = temp_dir("corrupt");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        let snapshot = SnapshotRecord { time: 20, seq: 2, vote: [7; 32], data: sealed(9) };
        storage.store_snapshot(&S, &snapshot, &[]).unwrap();
        let path = dir.join("sessions").join(S.to_string()).join("snapshot.bin");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(storage.load_session(&S), Err(StorageError::Corrupt { .. })));
        fs::write(&path, &bytes[..10]).unwrap();
        let error = storage.load_session(&S).unwrap_err();
        assert!(error.to_string().contains("corrupt"), "{error}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_torn_log_tail_is_cut_off_and_the_rest_kept() {
        let dir = temp_dir("torn");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        storage.append_events(&S, &[event(1, 10), event(2, 20)]).unwrap();
        drop(storage);
        let log = dir.join("sessions").join(S.to_string()).join("events.log");
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap(); // a record cut short
        drop(file);
        let mut storage = DiskStorage::open(&dir).unwrap();
        let stored = storage.load_session(&S).unwrap().unwrap();
        assert_eq!(stored.events, vec![event(1, 10), event(2, 20)]);
        // Appending after the cut works, and the file is clean again.
        storage.append_events(&S, &[event(3, 30)]).unwrap();
        drop(storage);
        let stored = DiskStorage::open(&dir).unwrap().load_session(&S).unwrap().unwrap();
        assert_eq!(stored.events.len(), 3);
        let _ = fs::remove_dir_all(dir);
    }
}
