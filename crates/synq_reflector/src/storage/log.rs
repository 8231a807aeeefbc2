//! The event log's format, and how a damaged log is read.
//!
//! ```text
//! log    = "SYNQLOG1" record+
//! record = len: u32 LE | checksum: 8 bytes | body: postcard LogRecord (len bytes)
//! ```
//!
//! The checksum is the first 8 bytes of SHA-256 of the body. Every way a log file comes into
//! being (a new session, a snapshot, a repair) writes the header and at least one record
//! atomically; records are appended after that. Hence a log without its header, or without any
//! intact record, is damaged, and the only damage a crash can cause is a torn tail: the last
//! record cut short at the end of the file.

use serde::{Deserialize, Serialize};
use synq_protocol::ids::hash_parts;
use synq_protocol::wire::{SessionTime, StampedEvent};

/// The first bytes of every event log.
const LOG_MAGIC: &[u8; 8] = b"SYNQLOG1";

/// Length field and checksum in front of each record body.
const RECORD_HEADER: usize = 12;

/// One entry of an event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) enum LogRecord {
    /// An event, as broadcast.
    Event(StampedEvent),
    /// Session time reached this value.
    Mark(SessionTime),
}

/// The first 8 bytes of SHA-256 of `bytes`.
pub(super) fn checksum(bytes: &[u8]) -> [u8; 8] {
    let hash = hash_parts(&[bytes]);
    hash[..8].try_into().expect("8 bytes")
}

/// Records as appended to a log: length, checksum, postcard body — each.
pub(super) fn encode_records(records: &[LogRecord]) -> Vec<u8> {
    let mut buffer = Vec::new();
    for record in records {
        let body = postcard::to_allocvec(record).expect("log records encode");
        buffer.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&checksum(&body));
        buffer.extend_from_slice(&body);
    }
    buffer
}

/// A whole log file: the header, `events`, and a mark of `time` (so the log carries the session's
/// clock, and always holds at least one record).
pub(super) fn new_log(events: &[StampedEvent], time: SessionTime) -> Vec<u8> {
    let records: Vec<LogRecord> = events.iter().cloned().map(LogRecord::Event).chain([LogRecord::Mark(time)]).collect();
    let mut bytes = LOG_MAGIC.to_vec();
    bytes.extend_from_slice(&encode_records(&records));
    bytes
}

/// What reading a log file found.
#[derive(Debug, Default)]
pub(super) struct ReadLog {
    /// Every intact event, in file order.
    pub events: Vec<StampedEvent>,
    /// The latest time of any intact record (event or mark); 0 if none.
    pub time: SessionTime,
    /// The header was missing or wrong (a file shorter than the header included).
    pub header_damaged: bool,
    /// Damaged stretches skipped; each held at least one record.
    pub records_skipped: u32,
    /// Bytes that belonged to no intact record (a damaged header included; a torn tail not).
    pub bytes_skipped: u64,
    /// Bytes of a torn tail: the last record, cut short at the end of the file by a crash while
    /// it was appended. It was never acknowledged.
    pub torn_bytes: u64,
    /// No intact record was found: whatever the log held is lost, its clock marks included.
    pub empty: bool,
}

impl ReadLog {
    /// Whether anything in the file was damaged (a torn tail is not damage).
    pub fn damaged(&self) -> bool {
        self.header_damaged || self.records_skipped > 0 || self.empty
    }
}

/// The intact record at `at`, and its length in bytes: its length field fits in the file, its
/// checksum matches, and its body decodes exactly.
fn record_at(bytes: &[u8], at: usize) -> Option<(LogRecord, usize)> {
    let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    let end = at.checked_add(RECORD_HEADER)?.checked_add(len)?;
    let body = bytes.get(at + RECORD_HEADER..end)?;
    if bytes[at + 4..at + RECORD_HEADER] != checksum(body) {
        return None;
    }
    match postcard::take_from_bytes::<LogRecord>(body) {
        Ok((record, [])) => Some((record, RECORD_HEADER + len)),
        _ => None,
    }
}

/// Whether the record at `at` runs past the end of the file (or its header does).
fn cut_short(bytes: &[u8], at: usize) -> bool {
    let rest = bytes.len() - at;
    rest < RECORD_HEADER
        || u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize > rest - RECORD_HEADER
}

/// The first position after `from` where an intact record starts.
fn next_intact(bytes: &[u8], from: usize) -> Option<usize> {
    (from + 1..bytes.len()).find(|&at| record_at(bytes, at).is_some())
}

/// Reads a log file, skipping damage: after a damaged record it resynchronises at the next
/// position where an intact record starts, so no intact record is lost. Only a cut-short last
/// record after at least one intact one is a torn tail; anything else that does not decode is
/// damage.
pub(super) fn read_log(bytes: &[u8]) -> ReadLog {
    let mut read = ReadLog::default();
    let mut at = if bytes.starts_with(LOG_MAGIC) {
        LOG_MAGIC.len()
    } else {
        // Records may start anywhere, even at 0 (a file that lost its header).
        read.header_damaged = true;
        let first = if record_at(bytes, 0).is_some() { Some(0) } else { next_intact(bytes, 0) };
        let skipped = first.unwrap_or(bytes.len());
        read.bytes_skipped = skipped as u64;
        // More than a header's worth of garbage held at least one record.
        if skipped > LOG_MAGIC.len() {
            read.records_skipped = 1;
        }
        skipped
    };
    let mut intact = 0usize;
    while at < bytes.len() {
        if let Some((record, used)) = record_at(bytes, at) {
            match record {
                LogRecord::Event(event) => {
                    read.time = read.time.max(event.time);
                    read.events.push(event);
                }
                LogRecord::Mark(time) => read.time = read.time.max(time),
            }
            intact += 1;
            at += used;
            continue;
        }
        let next = next_intact(bytes, at);
        if next.is_none() && intact > 0 && !read.header_damaged && cut_short(bytes, at) {
            read.torn_bytes = (bytes.len() - at) as u64;
            break;
        }
        let next = next.unwrap_or(bytes.len());
        read.records_skipped += 1;
        read.bytes_skipped += (next - at) as u64;
        at = next;
    }
    read.empty = intact == 0;
    read
}

#[cfg(test)]
mod tests {
    use super::*;
    use synq_protocol::crypto::Sealed;
    use synq_protocol::ids::ViewId;
    use synq_protocol::wire::EventBody;

    fn event(seq: u32, time: u64) -> StampedEvent {
        let payload = Sealed { nonce: [seq as u8; 24], ciphertext: vec![seq as u8; 40] };
        StampedEvent { time, seq, body: EventBody::View { sender: ViewId(3), sent: None, payload } }
    }

    /// A log as a session writes it: created with a mark, then events and marks appended.
    /// Returns the bytes and where each record starts.
    fn log_of(events: usize) -> (Vec<u8>, Vec<usize>, Vec<LogRecord>) {
        let mut bytes = new_log(&[], 0);
        let mut records = vec![LogRecord::Mark(0)];
        let mut starts = vec![LOG_MAGIC.len()];
        for n in 1..=events as u32 {
            records.push(LogRecord::Event(event(n, u64::from(n) * 10)));
            if n % 5 == 0 {
                records.push(LogRecord::Mark(u64::from(n) * 10 + 5));
            }
        }
        for record in &records[1..] {
            starts.push(bytes.len());
            bytes.extend_from_slice(&encode_records(std::slice::from_ref(record)));
        }
        (bytes, starts, records)
    }

    fn events_of(records: &[LogRecord]) -> Vec<StampedEvent> {
        records
            .iter()
            .filter_map(|r| match r {
                LogRecord::Event(e) => Some(e.clone()),
                LogRecord::Mark(_) => None,
            })
            .collect()
    }

    #[test]
    fn an_intact_log_reads_back_exactly() {
        let (bytes, _, records) = log_of(12);
        let read = read_log(&bytes);
        assert_eq!(read.events, events_of(&records));
        assert_eq!(read.time, 120);
        assert!(!read.damaged());
        assert_eq!((read.bytes_skipped, read.torn_bytes), (0, 0));
    }

    /// Every single flipped byte anywhere in a log loses at most the record it hit; every other
    /// event is recovered, and the loss is reported (or, for the last record's length field, it
    /// is a torn tail).
    #[test]
    fn any_flipped_byte_loses_at_most_the_record_it_hit() {
        let (bytes, starts, records) = log_of(30);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x5A;
            let read = read_log(&damaged);
            if position < LOG_MAGIC.len() {
                assert!(read.header_damaged && read.records_skipped == 0, "{position}");
                assert_eq!(read.events, events_of(&records), "{position}");
                continue;
            }
            let hit = starts.iter().rposition(|&s| s <= position).expect("a record");
            let mut expected = records.clone();
            expected.remove(hit);
            assert_eq!(read.events, events_of(&expected), "flip at {position} (record {hit})");
            let last = hit == records.len() - 1;
            if last && read.torn_bytes > 0 {
                // A length field that grew past the end of the file looks like a torn tail.
                assert!(position < starts[hit] + 4, "{position}");
                assert_eq!(read.torn_bytes as usize, bytes.len() - starts[hit]);
            } else {
                assert_eq!(read.records_skipped, 1, "flip at {position}");
                let end = starts.get(hit + 1).copied().unwrap_or(bytes.len());
                assert_eq!(read.bytes_skipped as usize, end - starts[hit], "flip at {position}");
            }
        }
    }

    #[test]
    fn a_torn_tail_is_not_damage() {
        let (bytes, starts, records) = log_of(6);
        let last = *starts.last().unwrap();
        for cut in last + 1..bytes.len() {
            let read = read_log(&bytes[..cut]);
            assert!(!read.damaged(), "cut at {cut}");
            assert_eq!(read.torn_bytes as usize, cut - last);
            assert_eq!(read.events, events_of(&records[..records.len() - 1]));
        }
    }

    #[test]
    fn a_log_without_its_header_or_any_intact_record_is_damaged() {
        let (bytes, _, records) = log_of(3);
        // (file length, header damaged, damaged stretches, bytes skipped)
        for (len, header, skipped, skipped_bytes) in
            [(0, true, 0, 0), (5, true, 0, 5), (8, false, 0, 0), (10, false, 1, 2), (20, false, 1, 12)]
        {
            let read = read_log(&bytes[..len]);
            assert!(read.damaged() && read.empty, "{len} bytes");
            assert_eq!(
                (read.header_damaged, read.records_skipped, read.bytes_skipped),
                (header, skipped, skipped_bytes)
            );
            assert_eq!(read.torn_bytes, 0);
            assert!(read.events.is_empty());
        }
        // Records without the header (a file that lost its first bytes) are all found.
        let read = read_log(&bytes[LOG_MAGIC.len()..]);
        assert!(read.header_damaged && read.records_skipped == 0 && read.bytes_skipped == 0);
        assert_eq!(read.events, events_of(&records));
    }

    #[test]
    fn a_damaged_stretch_over_several_records_is_skipped_as_one() {
        let (mut bytes, starts, records) = log_of(10);
        for byte in &mut bytes[starts[3] + 2..starts[6] + 2] {
            *byte = 0xEE;
        }
        let read = read_log(&bytes);
        let mut expected = records.clone();
        expected.drain(3..=6);
        assert_eq!(read.events, events_of(&expected));
        assert_eq!(read.records_skipped, 1);
        assert_eq!(read.bytes_skipped as usize, starts[7] - starts[3]);
    }
}
