//! [`DiskStorage`]: a data directory on local disk.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use synq_protocol::ids::{PersistentId, SessionId};
use synq_protocol::seq_le;
use synq_protocol::wire::{PersistRecord, SessionTime, SnapshotRecord, StampedEvent};

use super::log::{self, LogRecord, ReadLog};
use super::{SessionMeta, Storage, StorageDamage, StorageError, StoredSession, missing_seqs};

mod syncer;

use syncer::{Batch, Syncer};

/// A data directory on local disk.
///
/// ```text
/// <dir>/sessions/<session id>/meta.bin       session metadata          (atomic replace)
/// <dir>/sessions/<session id>/snapshot.bin   latest snapshot           (atomic replace)
/// <dir>/sessions/<session id>/events.log     events since, clock marks (append; rewritten atomically with a snapshot)
/// <dir>/persisted/<persistent id>.bin        persisted data            (atomic replace)
/// <dir>/persisted/<persistent id>.member     pinned membership key     (atomic, written once)
/// <any file>.damaged-<checksum>              a copy of a damaged file, kept for an operator
/// ```
///
/// Every file and every log record carries a checksum (the first 8 bytes of SHA-256). A damaged
/// file is reported as [`StorageError::Corrupt`], not loaded, and left in place; a damaged event
/// log is recovered record by record (see the [module documentation](super)).
pub struct DiskStorage {
    root: PathBuf,
    /// The event logs open for appending.
    logs: HashMap<SessionId, OpenLog>,
    /// Syncs logs off the caller's thread ([`Storage::sync`] returns at once).
    syncer: Syncer,
    /// Logs to sync that the syncer could not take yet (it was busy), and logs of sessions
    /// unloaded with events not synced.
    pending: Batch,
    /// The syncer refused the last batch: the logs in `pending` wait for it, and no log is
    /// added to them meanwhile (each would be another open descriptor for the same file).
    syncer_busy: bool,
}

/// A session's event log, open for appending, and the latest time recorded for the session.
struct OpenLog {
    file: File,
    time: SessionTime,
    /// Events were appended since the last [`Storage::sync`] (time marks alone do not count).
    unsynced: bool,
}

/// The first bytes of every file written by [`write_checked`].
const FILE_MAGIC: &[u8; 8] = b"SYNQSTR1";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, what: &'static str, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { path: path.to_path_buf(), what, reason: reason.into() }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().expect("storage paths name a file").to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let dir = path.parent().expect("storage paths have a parent");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = with_suffix(path, ".tmp");
    {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Keeps a copy of a damaged file's `bytes` beside it, as `<name>.damaged-<checksum>`, for an
/// operator (once per content: loading the same damaged file again adds no copy).
fn keep_damaged(path: &Path, bytes: &[u8]) -> Result<PathBuf, StorageError> {
    let sum: String = log::checksum(bytes).iter().map(|b| format!("{b:02x}")).collect();
    let copy = with_suffix(path, &format!(".damaged-{sum}"));
    if !copy.try_exists().map_err(io_err(&copy))? {
        write_file_atomic(&copy, bytes)?;
    }
    Ok(copy)
}

/// Writes `value` to `path` atomically, with a header and a checksum.
fn write_checked<T: Serialize>(path: &Path, value: &T, what: &'static str) -> Result<(), StorageError> {
    let body = postcard::to_allocvec(value).map_err(|e| corrupt(path, what, format!("cannot encode: {e}")))?;
    let mut bytes = FILE_MAGIC.to_vec();
    bytes.extend_from_slice(&log::checksum(&body));
    bytes.extend_from_slice(&body);
    write_file_atomic(path, &bytes)
}

/// Reads a file written by [`write_checked`]; `None` if it does not exist. A damaged file is an
/// error: it is left in place and a copy of it kept beside it.
fn read_checked<T: for<'de> Deserialize<'de>>(path: &Path, what: &'static str) -> Result<Option<T>, StorageError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let reason = if bytes.len() < 16 || !bytes.starts_with(FILE_MAGIC) {
        "missing header (truncated or not a bevy_synq file)".to_string()
    } else if bytes[8..16] != log::checksum(&bytes[16..]) {
        "checksum mismatch".to_string()
    } else {
        match postcard::take_from_bytes(&bytes[16..]) {
            Ok((value, [])) => return Ok(Some(value)),
            Ok((_, rest)) => format!("undecodable: {} bytes too many", rest.len()),
            Err(e) => format!("undecodable: {e}"),
        }
    };
    let error = corrupt(path, what, reason);
    match keep_damaged(path, &bytes) {
        Ok(copy) => tracing::error!(%error, copy = %copy.display(), "damaged file left in place, a copy kept"),
        Err(copy_error) => tracing::error!(%error, %copy_error, "damaged file left in place; no copy could be kept"),
    }
    Err(error)
}

impl DiskStorage {
    /// Opens (creating if needed) a data directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        for dir in [root.join("sessions"), root.join("persisted")] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let syncer = Syncer::start().map_err(io_err(&root))?;
        Ok(Self { root, logs: HashMap::new(), syncer, pending: Vec::new(), syncer_busy: false })
    }

    fn session_dir(&self, session: &SessionId) -> PathBuf {
        self.root.join("sessions").join(session.to_string())
    }

    fn log_path(&self, session: &SessionId) -> PathBuf {
        self.session_dir(session).join("events.log")
    }

    fn persisted_path(&self, persistent_id: &PersistentId, extension: &str) -> PathBuf {
        self.root.join("persisted").join(format!("{persistent_id}.{extension}"))
    }

    /// Reads a session's event log, recovers it if it is damaged or torn (a copy of a damaged
    /// log is kept, then the recovered content replaces it atomically), and opens it for
    /// appending. A missing log reads as an empty, damaged one.
    fn open_log(&mut self, session: &SessionId) -> Result<ReadLog, StorageError> {
        self.logs.remove(session);
        let path = self.log_path(session);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let read = log::read_log(&bytes);
        if read.damaged() {
            let copy = if bytes.is_empty() { None } else { Some(keep_damaged(&path, &bytes)?) };
            tracing::error!(
                path = %path.display(),
                copy = ?copy,
                header_damaged = read.header_damaged,
                records_skipped = read.records_skipped,
                bytes_skipped = read.bytes_skipped,
                events_recovered = read.events.len(),
                "damaged event log: the intact records are recovered"
            );
        }
        if read.torn_bytes > 0 {
            tracing::warn!(path = %path.display(), bytes = read.torn_bytes, "torn tail of an event log cut off");
        }
        if read.damaged() || read.torn_bytes > 0 {
            write_file_atomic(&path, &log::new_log(&read.events, read.time))?;
        }
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        self.logs.insert(*session, OpenLog { file, time: read.time, unsynced: false });
        Ok(read)
    }

    /// The session's log, open for appending (opened, and recovered if needed, on first use).
    fn open_log_of(&mut self, session: &SessionId) -> Result<&mut OpenLog, StorageError> {
        if !self.logs.contains_key(session) {
            self.open_log(session)?;
        }
        Ok(self.logs.get_mut(session).expect("opened above"))
    }

    fn append(&mut self, session: &SessionId, records: &[LogRecord]) -> Result<(), StorageError> {
        let buffer = log::encode_records(records);
        let latest = records.iter().map(|r| match r {
            LogRecord::Event(event) => event.time,
            LogRecord::Mark(time) => *time,
        });
        let latest = latest.max().unwrap_or(0);
        let log = self.open_log_of(session)?;
        match log.file.write_all(&buffer) {
            Ok(()) => {
                log.time = log.time.max(latest);
                log.unsynced |= records.iter().any(|r| matches!(r, LogRecord::Event(_)));
                Ok(())
            }
            Err(e) => {
                // A partly written record must not be followed by more: the log is reopened (and
                // its torn tail cut) before the next append.
                self.logs.remove(session);
                Err(io_err(&self.log_path(session))(e))
            }
        }
    }
}

impl Storage for DiskStorage {
    fn load_session(&mut self, session: &SessionId) -> Result<Option<StoredSession>, StorageError> {
        let dir = self.session_dir(session);
        let Some(meta) = read_checked::<SessionMeta>(&dir.join("meta.bin"), "session metadata")? else {
            return Ok(None);
        };
        let snapshot = read_checked::<SnapshotRecord>(&dir.join("snapshot.bin"), "snapshot")?;
        let read = self.open_log(session)?;
        let damaged = read.damaged();
        let mut events = read.events;
        // A crash between writing a snapshot and rewriting the log leaves events it covers.
        if let Some(snapshot) = &snapshot {
            events.retain(|e| !seq_le(e.seq, snapshot.seq));
        }
        let time = read.time.max(snapshot.as_ref().map_or(0, |s| s.time));
        self.logs.get_mut(session).expect("opened above").time = time;
        let missing = missing_seqs(snapshot.as_ref().map(|s| s.seq), &events);
        let damage = (damaged || !missing.is_empty()).then_some(StorageDamage {
            header_damaged: read.header_damaged,
            log_lost: read.empty,
            records_skipped: read.records_skipped,
            bytes_skipped: read.bytes_skipped,
            missing_seqs: missing,
        });
        Ok(Some(StoredSession { meta, snapshot, events, time, damage }))
    }

    fn create_session(&mut self, session: &SessionId, meta: &SessionMeta) -> Result<(), StorageError> {
        self.logs.remove(session);
        // Starting a stored session over (it continues from a replica): its snapshot is set aside,
        // never served again, and kept for the operator.
        let snapshot = self.session_dir(session).join("snapshot.bin");
        if snapshot.exists() {
            let aside = self.session_dir(session).join("snapshot.bin.superseded");
            fs::rename(&snapshot, &aside).map_err(io_err(&snapshot))?;
        }
        // The log first: a session is only there once its metadata is, and then it has a log.
        write_file_atomic(&self.log_path(session), &log::new_log(&[], 0))?;
        write_checked(&self.session_dir(session).join("meta.bin"), meta, "session metadata")
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
        // The rewritten log carries the latest time recorded, which may be after the snapshot's.
        let time = self.open_log_of(session)?.time.max(snapshot.time);
        write_checked(&self.session_dir(session).join("snapshot.bin"), snapshot, "snapshot")?;
        self.logs.remove(session);
        let path = self.log_path(session);
        write_file_atomic(&path, &log::new_log(remaining, time))?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        self.logs.insert(*session, OpenLog { file, time, unsynced: false });
        Ok(())
    }

    fn load_persisted(&mut self, persistent_id: &PersistentId) -> Result<Option<PersistRecord>, StorageError> {
        read_checked(&self.persisted_path(persistent_id, "bin"), "persisted data")
    }

    fn store_persisted(&mut self, persistent_id: &PersistentId, record: &PersistRecord) -> Result<(), StorageError> {
        write_checked(&self.persisted_path(persistent_id, "bin"), record, "persisted data")
    }

    fn load_member_key(&mut self, persistent_id: &PersistentId) -> Result<Option<[u8; 32]>, StorageError> {
        read_checked(&self.persisted_path(persistent_id, "member"), "membership key")
    }

    fn pin_member_key(&mut self, persistent_id: &PersistentId, key: &[u8; 32]) -> Result<(), StorageError> {
        write_checked(&self.persisted_path(persistent_id, "member"), key, "membership key")
    }

    /// Has the logs that events were appended to since the last sync synced on the storage's
    /// own thread, and returns at once: an `fdatasync` per active session in the reflector's
    /// loop held every session's events back. A failure is reported by the next call. While
    /// the thread is still busy with the previous batch, the logs wait for a later call.
    ///
    /// A log that only received time marks is left to the system's writeback: an idle session
    /// then costs no disk flush, and a mark lost with the machine's power only lets session time
    /// resume earlier, which clients handle by resyncing (see the durability contract in
    /// [`crate::storage`]).
    fn sync(&mut self) -> Result<(), StorageError> {
        let mut failed = None;
        if !self.syncer_busy {
            for (session, log) in self.logs.iter_mut().filter(|(_, log)| log.unsynced) {
                match log.file.try_clone() {
                    Ok(file) => {
                        self.pending.push((*session, file));
                        log.unsynced = false;
                    }
                    Err(error) => {
                        failed = Some((*session, error));
                        break;
                    }
                }
            }
        }
        if !self.pending.is_empty() {
            match self.syncer.submit(std::mem::take(&mut self.pending)) {
                Ok(()) => self.syncer_busy = false,
                Err(batch) => {
                    self.pending = batch;
                    self.syncer_busy = true;
                }
            }
        }
        match failed.or_else(|| self.syncer.failure()) {
            Some((session, error)) => Err(io_err(&self.log_path(&session))(error)),
            None => Ok(()),
        }
    }

    fn unload_session(&mut self, session: &SessionId) {
        if let Some(log) = self.logs.remove(session)
            && log.unsynced
        {
            self.pending.push((*session, log.file));
        }
    }
}

impl Drop for DiskStorage {
    /// Waits for the syncs under way, then syncs what is left here.
    fn drop(&mut self) {
        self.syncer.finish();
        let unsynced = self.logs.iter().filter(|(_, log)| log.unsynced).map(|(session, log)| (session, &log.file));
        for (session, file) in self.pending.iter().map(|(session, file)| (session, file)).chain(unsynced) {
            if let Err(error) = file.sync_data() {
                tracing::error!(%session, %error, "cannot sync an event log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synq_protocol::crypto::Sealed;
    use synq_protocol::ids::ViewId;
    use synq_protocol::membership::MemberSignature;
    use synq_protocol::wire::EventBody;

    fn temp_dir(name: &str) -> PathBuf {
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
        StampedEvent { time, seq, body: EventBody::View { sender: ViewId(3), sent: None, payload: sealed(seq as u8) } }
    }

    fn snapshot(time: u64, seq: u32) -> SnapshotRecord {
        SnapshotRecord { time, seq, vote: [7; 32], data: sealed(9), signature: MemberSignature::EMPTY }
    }

    const S: SessionId = SessionId([4; 32]);
    const P: PersistentId = PersistentId([5; 32]);

    fn meta() -> SessionMeta {
        SessionMeta {
            persistent_id: P,
            tick_ms: 50,
            initial_persisted: None,
            reseeded_from: None,
            initial_persisted_damaged: None,
        }
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("sessions").join(S.to_string()).join("events.log")
    }

    /// The `.damaged-*` copies beside `path`.
    fn copies_of(path: &Path) -> Vec<PathBuf> {
        let prefix = format!("{}.damaged-", path.file_name().unwrap().to_str().unwrap());
        let mut copies: Vec<PathBuf> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&prefix))
            .collect();
        copies.sort();
        copies
    }

    /// A session of `n` events (seq 1..=n, 10 ms apart) with a clock mark after every tenth, as
    /// stored; returns the directory and where each event's record starts in the log.
    fn stored_session(name: &str, n: u32) -> (PathBuf, Vec<usize>) {
        let dir = temp_dir(name);
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        let mut starts = Vec::new();
        for seq in 1..=n {
            starts.push(fs::metadata(log_path(&dir)).unwrap().len() as usize);
            storage.append_events(&S, &[event(seq, u64::from(seq) * 10)]).unwrap();
            if seq % 10 == 0 {
                storage.mark_time(&S, u64::from(seq) * 10 + 5).unwrap();
            }
        }
        (dir, starts)
    }

    fn events(seqs: impl IntoIterator<Item = u32>) -> Vec<StampedEvent> {
        seqs.into_iter().map(|seq| event(seq, u64::from(seq) * 10)).collect()
    }

    fn load(dir: &Path) -> StoredSession {
        DiskStorage::open(dir).unwrap().load_session(&S).unwrap().expect("stored")
    }

    /// Damages the log with `damage`, loads it, and checks the original was kept aside and the
    /// log replaced by its recovered content (which then loads without record damage).
    fn load_damaged(dir: &Path, damage: impl FnOnce(&mut Vec<u8>)) -> StoredSession {
        let path = log_path(dir);
        let mut bytes = fs::read(&path).unwrap();
        damage(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        let stored = load(dir);
        let copies = copies_of(&path);
        if bytes.is_empty() {
            assert!(copies.is_empty(), "an empty file needs no copy");
        } else {
            assert_eq!(copies.len(), 1, "{copies:?}");
            assert_eq!(fs::read(&copies[0]).unwrap(), bytes, "the damaged original is kept untouched");
        }
        let again = load(dir);
        assert_eq!(again.events, stored.events, "the recovered log holds what was recovered");
        assert!(again.damage.as_ref().is_none_or(|d| d.records_skipped == 0 && !d.header_damaged));
        assert_eq!(copies_of(&path).len(), copies.len(), "loading the recovered log adds no copy");
        stored
    }

    #[test]
    fn a_session_survives_reopening_the_directory() {
        let dir = temp_dir("reopen");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        storage.append_events(&S, &[event(1, 10), event(2, 20)]).unwrap();
        storage.store_snapshot(&S, &snapshot(20, 2), &[]).unwrap();
        storage.append_events(&S, &[event(3, 30)]).unwrap();
        storage.mark_time(&S, 75).unwrap();
        let persisted = PersistRecord { time: 5, vote: [8; 32], data: sealed(2), signature: MemberSignature::EMPTY };
        storage.store_persisted(&P, &persisted).unwrap();
        storage.pin_member_key(&P, &[6; 32]).unwrap();
        drop(storage);

        let mut storage = DiskStorage::open(&dir).unwrap();
        let stored = storage.load_session(&S).unwrap().expect("stored");
        assert_eq!(stored.meta, meta());
        assert_eq!(stored.snapshot, Some(snapshot(20, 2)));
        assert_eq!(stored.events, vec![event(3, 30)]);
        assert_eq!(stored.time, 75);
        assert_eq!(stored.damage, None);
        assert_eq!(storage.load_persisted(&P).unwrap(), Some(persisted));
        assert_eq!(storage.load_member_key(&P).unwrap(), Some([6; 32]));
        assert_eq!(storage.load_member_key(&PersistentId([1; 32])).unwrap(), None);
        assert!(storage.load_session(&SessionId([9; 32])).unwrap().is_none());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn syncs_run_beside_appends_and_lose_nothing() {
        let dir = temp_dir("syncer");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        let events: Vec<StampedEvent> = (1..=60).map(|seq| event(seq, u64::from(seq) * 10)).collect();
        for (i, event) in events.iter().enumerate() {
            storage.append_events(&S, std::slice::from_ref(event)).unwrap();
            // Returns at once, whether the syncer took the logs or was busy with earlier ones.
            storage.sync().unwrap();
            if i % 20 == 10 {
                storage.unload_session(&S); // its unsynced log is synced later
            }
        }
        drop(storage); // waits for the syncs under way and syncs what is left

        let mut storage = DiskStorage::open(&dir).unwrap();
        let stored = storage.load_session(&S).unwrap().expect("stored");
        assert_eq!(stored.events, events);
        assert_eq!(stored.damage, None);
        let _ = fs::remove_dir_all(dir);
    }

    /// The reported bug: killed just after a snapshot was stored, the reflector resumed at the
    /// snapshot's time although clients had seen later times.
    #[test]
    fn a_snapshot_keeps_the_latest_recorded_time() {
        let dir = temp_dir("time");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        storage.append_events(&S, &[event(1, 2_000)]).unwrap();
        storage.mark_time(&S, 3_014).unwrap();
        storage.store_snapshot(&S, &snapshot(2_100, 1), &[]).unwrap();
        drop(storage); // kill -9
        assert_eq!(load(&dir).time, 3_014);

        // Also when the process that stores the snapshot never loaded the session.
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.mark_time(&S, 4_000).unwrap();
        drop(storage);
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.store_snapshot(&S, &snapshot(3_500, 1), &[]).unwrap();
        drop(storage);
        let stored = load(&dir);
        assert_eq!((stored.time, stored.damage), (4_000, None));
        let _ = fs::remove_dir_all(dir);
    }

    /// A crash between storing a snapshot and rewriting the log leaves the old log: the events
    /// the snapshot covers are not served again.
    #[test]
    fn events_a_snapshot_covers_are_left_out() {
        let (dir, _) = stored_session("covered", 5);
        let path = dir.join("sessions").join(S.to_string()).join("snapshot.bin");
        write_checked(&path, &snapshot(30, 3), "snapshot").unwrap();
        let stored = load(&dir);
        assert_eq!(stored.events, events(4..=5));
        assert_eq!((stored.time, stored.damage), (50, None));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_flipped_byte_mid_log_loses_only_its_record() {
        let (dir, starts) = stored_session("flip", 203);
        let stored = load_damaged(&dir, |bytes| bytes[starts[100] + 30] ^= 0x01);
        assert_eq!(stored.events, events((1..=100).chain(102..=203)));
        let damage = stored.damage.expect("reported");
        assert_eq!(damage.records_skipped, 1);
        assert_eq!(damage.bytes_skipped as usize, starts[101] - starts[100]);
        assert_eq!(damage.missing_seqs, vec![(101, 101)]);
        assert!(!damage.header_damaged && !damage.log_lost);
        assert_eq!(stored.time, 2_030);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_damaged_first_event_loses_only_itself() {
        let (dir, starts) = stored_session("first", 20);
        let stored = load_damaged(&dir, |bytes| bytes[starts[0] + 13] ^= 0x80);
        assert_eq!(stored.events, events(2..=20));
        let damage = stored.damage.expect("reported");
        // Without a snapshot, nothing says where the events began.
        assert_eq!((damage.records_skipped, damage.missing_seqs.is_empty()), (1, true));
        let _ = fs::remove_dir_all(dir);
    }

    /// Missing sequence numbers are counted from the snapshot's, across the u32 wrap.
    #[test]
    fn missing_events_are_named_from_the_snapshot_on() {
        let dir = temp_dir("wrap");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.create_session(&S, &meta()).unwrap();
        let seqs: Vec<u32> = (1..=20).map(|n| synq_protocol::INITIAL_SEQ.wrapping_add(n)).collect();
        let all: Vec<StampedEvent> = seqs.iter().zip(1..).map(|(&seq, n)| event(seq, n * 10)).collect();
        storage.append_events(&S, &all[..4]).unwrap();
        storage.store_snapshot(&S, &snapshot(40, seqs[3]), &[]).unwrap();
        let mut starts = Vec::new();
        for event in &all[4..] {
            starts.push(fs::metadata(log_path(&dir)).unwrap().len() as usize);
            storage.append_events(&S, std::slice::from_ref(event)).unwrap();
        }
        drop(storage);
        // Lose the first event after the snapshot, and the one with sequence number 0.
        let zero = seqs.iter().position(|&s| s == 0).unwrap();
        let stored = load_damaged(&dir, |bytes| {
            bytes[starts[0] + 20] ^= 0x01;
            bytes[starts[zero - 4] + 20] ^= 0x01;
        });
        let mut expected = all[5..].to_vec();
        expected.retain(|e| e.seq != 0);
        assert_eq!(stored.events, expected);
        let damage = stored.damage.expect("reported");
        assert_eq!(damage.records_skipped, 2);
        assert_eq!(damage.missing_seqs, vec![(seqs[4], seqs[4]), (0, 0)]);
        assert_eq!(load(&dir).damage.expect("still missing").missing_seqs, damage.missing_seqs);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_damaged_first_record_loses_no_event() {
        // The first record is the clock mark written with the session.
        let (dir, starts) = stored_session("mark", 20);
        let stored = load_damaged(&dir, |bytes| bytes[starts[0] - 1] ^= 0x01);
        assert_eq!(stored.events, events(1..=20));
        let damage = stored.damage.expect("reported");
        assert_eq!((damage.records_skipped, damage.missing_seqs.is_empty()), (1, true));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_damaged_header_loses_no_event() {
        let (dir, _) = stored_session("header", 203);
        let stored = load_damaged(&dir, |bytes| bytes[2] = b'X');
        assert_eq!(stored.events, events(1..=203));
        let damage = stored.damage.expect("reported");
        assert!(damage.header_damaged && !damage.log_lost);
        assert_eq!((damage.records_skipped, damage.bytes_skipped), (0, 8));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_log_cut_to_10_bytes_is_reported_lost() {
        let (dir, _) = stored_session("ten", 203);
        let stored = load_damaged(&dir, |bytes| bytes.truncate(10));
        assert!(stored.events.is_empty());
        let damage = stored.damage.expect("reported");
        assert!(damage.log_lost && !damage.header_damaged, "{damage:?}");
        assert_eq!((damage.records_skipped, damage.bytes_skipped), (1, 2));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn an_empty_or_missing_log_is_reported_lost() {
        let (dir, _) = stored_session("empty", 203);
        let stored = load_damaged(&dir, Vec::clear);
        assert!(stored.events.is_empty());
        let damage = stored.damage.expect("reported");
        assert!(damage.log_lost && damage.header_damaged);
        assert_eq!((damage.records_skipped, damage.bytes_skipped), (0, 0));
        fs::remove_file(log_path(&dir)).unwrap();
        let stored = load(&dir);
        assert!(stored.damage.expect("reported").log_lost);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_torn_log_tail_is_cut_off_not_reported() {
        let (dir, _) = stored_session("torn", 2);
        let path = log_path(&dir);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap(); // a record cut short
        drop(file);
        let mut storage = DiskStorage::open(&dir).unwrap();
        let stored = storage.load_session(&S).unwrap().unwrap();
        assert_eq!((stored.events, stored.damage), (events(1..=2), None));
        assert!(copies_of(&path).is_empty(), "a torn tail is not damage");
        // Appending after the cut works, and the file is clean again.
        storage.append_events(&S, &[event(3, 30)]).unwrap();
        drop(storage);
        let stored = load(&dir);
        assert_eq!((stored.events, stored.damage), (events(1..=3), None));
        let _ = fs::remove_dir_all(dir);
    }

    /// The first append in a process recovers the log first, so it never follows a torn record.
    #[test]
    fn appending_without_loading_first_cuts_a_torn_tail() {
        let (dir, _) = stored_session("append", 2);
        let mut file = OpenOptions::new().append(true).open(log_path(&dir)).unwrap();
        file.write_all(&[200, 0, 0]).unwrap();
        drop(file);
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.append_events(&S, &[event(3, 30)]).unwrap();
        drop(storage);
        let stored = load(&dir);
        assert_eq!((stored.events, stored.damage), (events(1..=3), None));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_damaged_persisted_file_is_an_error_and_left_in_place() {
        let dir = temp_dir("persisted");
        let mut storage = DiskStorage::open(&dir).unwrap();
        let persisted = PersistRecord { time: 5, vote: [8; 32], data: sealed(2), signature: MemberSignature::EMPTY };
        storage.store_persisted(&P, &persisted).unwrap();
        let path = dir.join("persisted").join(format!("{P}.bin"));
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        for _ in 0..2 {
            let error = storage.load_persisted(&P).unwrap_err();
            assert!(matches!(&error, StorageError::Corrupt { what: "persisted data", .. }), "{error}");
            assert_eq!(error.public_reason(), "the stored persisted data is damaged (checksum mismatch)");
        }
        assert_eq!(fs::read(&path).unwrap(), bytes, "left in place");
        assert_eq!(copies_of(&path).len(), 1, "one copy, however often it is loaded");
        // Storing new data replaces it; the copy stays for the operator.
        storage.store_persisted(&P, &persisted).unwrap();
        assert_eq!(storage.load_persisted(&P).unwrap(), Some(persisted));
        assert_eq!(fs::read(&copies_of(&path)[0]).unwrap(), bytes);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn damaged_session_files_are_errors() {
        let (dir, _) = stored_session("meta", 3);
        let session_dir = dir.join("sessions").join(S.to_string());
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.store_snapshot(&S, &snapshot(20, 2), &events(3..=3)).unwrap();
        for (file, what) in [("snapshot.bin", "snapshot"), ("meta.bin", "session metadata")] {
            let path = session_dir.join(file);
            let good = fs::read(&path).unwrap();
            let mut bytes = good.clone();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xFF;
            fs::write(&path, &bytes).unwrap();
            let error = storage.load_session(&S).unwrap_err();
            assert!(matches!(&error, StorageError::Corrupt { what: w, .. } if *w == what), "{error}");
            fs::write(&path, &bytes[..10]).unwrap();
            let error = storage.load_session(&S).unwrap_err();
            assert!(error.to_string().contains("corrupt"), "{error}");
            assert!(error.public_reason().contains("missing header"), "{}", error.public_reason());
            assert_eq!(fs::read(&path).unwrap(), &bytes[..10], "left in place");
            assert_eq!(copies_of(&path).len(), 2);
            fs::write(&path, &good).unwrap();
        }
        assert_eq!(load(&dir).events, events(3..=3));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_damaged_membership_key_is_an_error() {
        let dir = temp_dir("member");
        let mut storage = DiskStorage::open(&dir).unwrap();
        storage.pin_member_key(&P, &[6; 32]).unwrap();
        let path = dir.join("persisted").join(format!("{P}.member"));
        let mut bytes = fs::read(&path).unwrap();
        bytes[30] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let error = storage.load_member_key(&P).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { what: "membership key", .. }), "{error}");
        let _ = fs::remove_dir_all(dir);
    }
}
