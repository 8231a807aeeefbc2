//! Damage to a reflector's data directory, applied from outside as a disk or an operator would:
//! the storage keeps every intact acknowledged event, reports what was lost, never destroys a
//! damaged file, and never lets session time go backwards.

use std::fs;
use std::path::{Path, PathBuf};

use synq_protocol::crypto::Sealed;
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::MemberSignature;
use synq_protocol::wire::{EventBody, PersistRecord, SnapshotRecord, StampedEvent};
use synq_reflector::storage::{DiskStorage, SessionMeta, Storage, StorageError, StoredSession};

const S: SessionId = SessionId([4; 32]);
const P: PersistentId = PersistentId([5; 32]);
const EVENTS: u32 = 203;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("synq-storage-damage-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn sealed(byte: u8) -> Sealed {
    Sealed { nonce: [byte; 24], ciphertext: vec![byte; 40] }
}

fn event(seq: u32) -> StampedEvent {
    StampedEvent {
        time: u64::from(seq) * 10,
        seq,
        body: EventBody::View { sender: ViewId(3), sent: None, payload: sealed(seq as u8) },
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("sessions").join(S.to_string()).join("events.log")
}

/// Files beside `path` whose name starts with its name followed by `.damaged-`.
fn copies_of(path: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}.damaged-", path.file_name().unwrap().to_str().unwrap());
    fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&prefix))
        .collect()
}

/// A session of 203 acknowledged events, appended one by one with clock marks between; returns
/// the directory and the log's length before each event was appended.
fn stored_session(name: &str) -> (PathBuf, Vec<usize>) {
    let dir = temp_dir(name);
    let mut storage = DiskStorage::open(&dir).unwrap();
    let meta = SessionMeta {
        persistent_id: P,
        tick_ms: 50,
        initial_persisted: None,
        reseeded_from: None,
        initial_persisted_damaged: None,
    };
    storage.create_session(&S, &meta).unwrap();
    let mut starts = Vec::new();
    for seq in 1..=EVENTS {
        starts.push(fs::metadata(log_path(&dir)).unwrap().len() as usize);
        storage.append_events(&S, &[event(seq)]).unwrap();
        if seq % 7 == 0 {
            storage.mark_time(&S, u64::from(seq) * 10 + 3).unwrap();
        }
    }
    storage.sync().unwrap();
    (dir, starts)
}

fn load(dir: &Path) -> StoredSession {
    DiskStorage::open(dir).unwrap().load_session(&S).unwrap().expect("the session is stored")
}

/// Writes `damaged` as the log, loads the session, checks the damaged file was kept untouched
/// beside the recovered log, and puts the original log back.
fn load_with_log(dir: &Path, original: &[u8], damaged: &[u8]) -> StoredSession {
    let path = log_path(dir);
    fs::write(&path, damaged).unwrap();
    let stored = load(dir);
    let copies = copies_of(&path);
    if damaged.is_empty() || stored.damage.is_none() {
        assert!(copies.is_empty(), "{copies:?}");
    } else {
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(fs::read(&copies[0]).unwrap(), damaged, "the damaged log is kept as it was");
        fs::remove_file(&copies[0]).unwrap();
    }
    fs::write(&path, original).unwrap();
    stored
}

#[test]
fn a_flipped_byte_anywhere_loses_at_most_the_event_it_hit() {
    let (dir, starts) = stored_session("flip");
    let original = fs::read(log_path(&dir)).unwrap();
    let all: Vec<StampedEvent> = (1..=EVENTS).map(event).collect();
    // Every 31st byte, and every byte of one record in the middle.
    let middle = starts[101]..starts[102];
    let positions = (0..original.len()).step_by(31).chain(middle);
    for position in positions {
        let mut damaged = original.clone();
        damaged[position] ^= 0x24;
        let stored = load_with_log(&dir, &original, &damaged);
        // The byte is in the header, or in the stretch of one event: its record and maybe a mark.
        let stretch = starts.iter().rposition(|&s| s <= position).map(|i| i as u32 + 1);
        let lost: Vec<u32> = (1..=EVENTS).filter(|&seq| !stored.events.contains(&event(seq))).collect();
        assert!(lost.is_empty() || lost == [stretch.unwrap()], "byte {position} flipped, lost {lost:?}");
        let expected: Vec<StampedEvent> = all.iter().filter(|e| !lost.contains(&e.seq)).cloned().collect();
        assert_eq!(stored.events, expected, "byte {position} flipped");
        let Some(damage) = stored.damage else {
            // Only the last record's length field, grown past the end, reads as a torn tail.
            assert!(position >= *starts.last().unwrap(), "byte {position}: damage not reported");
            continue;
        };
        match lost[..] {
            // Without a snapshot, a gap is named once an event before it was recovered.
            [seq] if seq > 1 && seq < EVENTS => assert_eq!(damage.missing_seqs, vec![(seq, seq)], "byte {position}"),
            _ => assert!(damage.missing_seqs.is_empty(), "byte {position}"),
        }
        assert!(damage.header_damaged || damage.records_skipped == 1, "byte {position}: {damage:?}");
        assert!(!damage.to_string().contains('/'), "no paths for clients: {damage}");
    }
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_damaged_header_short_or_empty_log_is_reported() {
    let (dir, _) = stored_session("short");
    let original = fs::read(log_path(&dir)).unwrap();
    let all: Vec<StampedEvent> = (1..=EVENTS).map(event).collect();

    let mut header = original.clone();
    header[0] ^= 0xFF;
    let stored = load_with_log(&dir, &original, &header);
    assert_eq!(stored.events, all, "a damaged header loses no event");
    let damage = stored.damage.expect("a damaged header is reported");
    assert!(damage.header_damaged && !damage.log_lost);

    for len in [10, 0] {
        let stored = load_with_log(&dir, &original, &original[..len]);
        assert!(stored.events.is_empty());
        let damage = stored.damage.expect("a cut log is reported");
        assert!(damage.log_lost, "{len} bytes: {damage:?}");
        assert!(damage.to_string().contains("no intact record"), "{damage}");
    }
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_torn_tail_is_cut_and_not_reported() {
    let (dir, starts) = stored_session("torn");
    let original = fs::read(log_path(&dir)).unwrap();
    // The last event, cut short while it was appended: never acknowledged.
    let last = *starts.last().unwrap();
    let stored = load_with_log(&dir, &original, &original[..last + 20]);
    assert_eq!(stored.events, (1..EVENTS).map(event).collect::<Vec<_>>());
    assert_eq!(stored.damage, None);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn session_time_survives_a_kill_just_after_a_snapshot() {
    let (dir, _) = stored_session("time");
    let mut storage = DiskStorage::open(&dir).unwrap();
    assert_eq!(storage.load_session(&S).unwrap().unwrap().time, 2_033);
    storage.mark_time(&S, 3_014).unwrap();
    let snapshot =
        SnapshotRecord { time: 2_100, seq: EVENTS, vote: [7; 32], data: sealed(9), signature: MemberSignature::EMPTY };
    storage.store_snapshot(&S, &snapshot, &[]).unwrap();
    drop(storage); // kill -9 just after the snapshot was stored
    let stored = load(&dir);
    assert_eq!((stored.time, stored.events.len(), stored.damage), (3_014, 0, None));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_damaged_persisted_file_is_an_error_not_missing_data() {
    let dir = temp_dir("persisted");
    let mut storage = DiskStorage::open(&dir).unwrap();
    let record = PersistRecord { time: 5, vote: [8; 32], data: sealed(2), signature: MemberSignature::EMPTY };
    storage.store_persisted(&P, &record).unwrap();
    let path = dir.join("persisted").join(format!("{P}.bin"));
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let error = DiskStorage::open(&dir).unwrap().load_persisted(&P).unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains(&path.display().to_string()), "the server's log names the file: {error}");
    assert!(!error.public_reason().contains(&dir.display().to_string()), "{}", error.public_reason());
    assert_eq!(fs::read(&path).unwrap(), bytes, "left in place for an operator");
    assert_eq!(copies_of(&path).len(), 1, "and a copy kept");
    let _ = fs::remove_dir_all(dir);
}
