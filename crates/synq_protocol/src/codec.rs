//! The bounded binary encoding of [`ClientMessage`] and [`ServerMessage`].
//!
//! Frames are `b"SQ"`, the protocol version (u16, little endian), then the postcard encoding of
//! the message. postcard was chosen over bincode because its format is specified and stable, it
//! is compact (varints), and its deserializer never trusts a length prefix for an allocation
//! beyond the bytes actually present. Every decode checks the frame size first and the payload
//! limits after, and returns a [`DecodeError`] on anything else.
//!
//! A frame larger than one transport message is sent as several *chunk frames* (`b"SC"`, the
//! version, then a postcard [`Chunk`]): [`split_frame`] makes them and a [`Defragmenter`] on the
//! receiving side turns them back into the frame, within [`Limits::max_chunks`] and
//! [`Limits::max_frame_bytes`].

use crate::PROTOCOL_VERSION;
use crate::chunk::{Chunk, ChunkError, Reassembler, split};
use crate::limits::Limits;
use crate::wire::{ClientMessage, EventBody, ServerMessage, SyncStart};
use serde::Serialize;
use std::borrow::Cow;

const MAGIC: &[u8; 2] = b"SQ";
const CHUNK_MAGIC: &[u8; 2] = b"SC";
const HEADER: usize = 4;

/// The most bytes a chunk frame adds around its data: the header and postcard's varints for the
/// payload id, index, count, total length and data length.
pub const CHUNK_FRAME_OVERHEAD: usize = HEADER + 5 + 5 + 5 + 10 + 5;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame is larger than [`Limits::max_frame_bytes`].
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Size of the frame.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame does not start with the bevy_synq magic.
    #[error("not a bevy_synq frame")]
    BadMagic,
    /// The frame was encoded by another protocol version.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A payload inside the message exceeds its limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Which payload.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    encode_with(MAGIC, message)
}

fn encode_with<T: Serialize>(magic: &[u8; 2], message: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(magic);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    postcard::to_io(message, &mut out).expect("encoding into a Vec cannot fail");
    out
}

/// Encodes a client message as one frame.
pub fn encode_client(message: &ClientMessage) -> Vec<u8> {
    encode(message)
}

/// Encodes a server message as one frame.
pub fn encode_server(message: &ServerMessage) -> Vec<u8> {
    encode(message)
}

fn body<'a>(frame: &'a [u8], limits: &Limits) -> Result<&'a [u8], DecodeError> {
    body_with(MAGIC, frame, limits)
}

fn body_with<'a>(magic: &[u8; 2], frame: &'a [u8], limits: &Limits) -> Result<&'a [u8], DecodeError> {
    if frame.len() > limits.max_frame_bytes {
        return Err(DecodeError::FrameTooLarge { size: frame.len(), limit: limits.max_frame_bytes });
    }
    if frame.len() < HEADER || &frame[..2] != magic {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([frame[2], frame[3]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok(&frame[HEADER..])
}

fn check(what: &'static str, size: usize, limit: usize) -> Result<(), DecodeError> {
    if size > limit { Err(DecodeError::PayloadTooLarge { what, size, limit }) } else { Ok(()) }
}

/// Decodes a client frame, enforcing `limits`.
pub fn decode_client(frame: &[u8], limits: &Limits) -> Result<ClientMessage, DecodeError> {
    let (message, rest) = postcard::take_from_bytes::<ClientMessage>(body(frame, limits)?)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    match &message {
        ClientMessage::Event(event) => check("event payload", event.payload.len(), limits.max_event_bytes)?,
        ClientMessage::SnapshotUpload(record) => check("snapshot", record.data.len(), limits.max_snapshot_bytes)?,
        ClientMessage::PersistUpload(record) => check("persisted data", record.data.len(), limits.max_persist_bytes)?,
        ClientMessage::Join(join) => {
            check("app id", join.app_id.len(), 256)?;
        }
        ClientMessage::HashVote(vote) => check("vote parts", vote.parts.len(), limits.max_vote_parts)?,
        ClientMessage::Ping(_) | ClientMessage::Leave => {}
    }
    Ok(message)
}

/// Decodes a server frame, enforcing `limits`.
pub fn decode_server(frame: &[u8], limits: &Limits) -> Result<ServerMessage, DecodeError> {
    let (message, rest) = postcard::take_from_bytes::<ServerMessage>(body(frame, limits)?)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    let check_body = |body: &EventBody| match body {
        EventBody::View { payload, .. } => check("event payload", payload.len(), limits.max_event_bytes),
        _ => Ok(()),
    };
    match &message {
        ServerMessage::Event(event) => check_body(&event.body)?,
        ServerMessage::Tally(tally) => {
            for group in &tally.groups {
                check("vote parts", group.parts.len(), limits.max_vote_parts)?;
            }
        }
        ServerMessage::Sync(sync) => {
            if sync.events.len() > limits.max_sync_events {
                return Err(DecodeError::PayloadTooLarge {
                    what: "sync event count",
                    size: sync.events.len(),
                    limit: limits.max_sync_events,
                });
            }
            for event in &sync.events {
                check_body(&event.body)?;
            }
            match &sync.start {
                SyncStart::Snapshot(record) => check("snapshot", record.data.len(), limits.max_snapshot_bytes)?,
                SyncStart::Fresh { persisted: Some(record), persisted_damaged } => {
                    if let Some(reason) = persisted_damaged {
                        check("persisted-data damage report", reason.len(), 4096)?;
                    }
                    check("persisted data", record.data.len(), limits.max_persist_bytes)?
                }
                _ => {}
            }
        }
        ServerMessage::Consensus(record) => check("snapshot", record.data.len(), limits.max_snapshot_bytes)?,
        _ => {}
    }
    Ok(message)
}

/// Encodes a chunk as a chunk frame.
pub fn encode_chunk(chunk: &Chunk) -> Vec<u8> {
    encode_with(CHUNK_MAGIC, chunk)
}

/// Decodes a chunk frame, enforcing `limits` (frame size, chunk count).
pub fn decode_chunk(frame: &[u8], limits: &Limits) -> Result<Chunk, DecodeError> {
    let (chunk, rest) = postcard::take_from_bytes::<Chunk>(body_with(CHUNK_MAGIC, frame, limits)?)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    if chunk.count == 0 || chunk.count > limits.max_chunks {
        return Err(DecodeError::Malformed(format!(
            "chunk count {} not within 1..={}",
            chunk.count, limits.max_chunks
        )));
    }
    Ok(chunk)
}

/// Splits an encoded frame for a transport whose messages hold at most `max_message` bytes:
/// the frame itself if it fits, else chunk frames of at most `max_message` bytes each (at least
/// [`CHUNK_FRAME_OVERHEAD`] + 1 bytes). `payload_id` must differ from the ids of other split
/// frames still in flight on the same connection (a wrapping counter does).
pub fn split_frame(frame: Vec<u8>, payload_id: u32, max_message: usize) -> Vec<Vec<u8>> {
    if frame.len() <= max_message {
        return vec![frame];
    }
    let max_chunk = max_message.saturating_sub(CHUNK_FRAME_OVERHEAD).max(1);
    split(payload_id, &frame, max_chunk).iter().map(encode_chunk).collect()
}

/// Why a transport message could not be turned into a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The chunk frame could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The chunk was refused by the reassembler.
    #[error("chunk refused: {0}")]
    Chunk(#[from] ChunkError),
    /// A reassembled frame was itself a chunk frame.
    #[error("a reassembled frame is itself a chunk")]
    NestedChunk,
}

/// Turns the transport messages of one connection back into frames: whole frames pass through,
/// chunk frames are collected until their frame is complete. Holds at most
/// [`Limits::max_frame_bytes`] bytes of partial frames.
#[derive(Debug)]
pub struct Defragmenter {
    limits: Limits,
    reassembler: Reassembler,
}

impl Defragmenter {
    /// A defragmenter enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self { limits: *limits, reassembler: Reassembler::new(limits, limits.max_frame_bytes) }
    }

    /// Takes one transport message; returns a complete frame (to pass to [`decode_client`] or
    /// [`decode_server`]) when there is one.
    pub fn push<'a>(&mut self, message: &'a [u8]) -> Result<Option<Cow<'a, [u8]>>, FrameError> {
        if !message.starts_with(CHUNK_MAGIC) {
            return Ok(Some(Cow::Borrowed(message)));
        }
        let chunk = decode_chunk(message, &self.limits)?;
        match self.reassembler.push(chunk)? {
            Some(frame) if frame.starts_with(CHUNK_MAGIC) => Err(FrameError::NestedChunk),
            Some(frame) => Ok(Some(Cow::Owned(frame))),
            None => Ok(None),
        }
    }

    /// Bytes held by partially received frames.
    pub fn in_flight_bytes(&self) -> usize {
        self.reassembler.in_flight_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Sealed;
    use crate::wire::SnapshotRecord;

    #[test]
    fn round_trip_and_garbage() {
        let limits = Limits::default();
        let msg = ClientMessage::Event(Sealed { nonce: [1; 24], ciphertext: vec![5; 40] }.into());
        let frame = encode_client(&msg);
        assert_eq!(decode_client(&frame, &limits).unwrap(), msg);
        for cut in 0..frame.len() {
            assert!(decode_client(&frame[..cut], &limits).is_err(), "truncated at {cut}");
        }
        assert_eq!(decode_client(b"XX\x01\x00", &limits), Err(DecodeError::BadMagic));
        assert_eq!(decode_client(b"SQ\x09\x00\x00", &limits), Err(DecodeError::Version(9)));
    }

    #[test]
    fn a_redirect_carries_its_address_and_a_cut_one_is_refused() {
        let limits = Limits::default();
        for to in ["10.0.0.7:5800", "[2001:db8::1]:5801"] {
            let msg = ServerMessage::Redirect(to.parse().unwrap());
            let frame = encode_server(&msg);
            assert_eq!(decode_server(&frame, &limits).unwrap(), msg);
            for cut in 0..frame.len() {
                assert!(decode_server(&frame[..cut], &limits).is_err(), "truncated at {cut}");
            }
        }
    }

    #[test]
    fn oversized_event_is_refused() {
        let limits = Limits { max_event_bytes: 100, ..Limits::default() };
        let msg = ClientMessage::Event(Sealed { nonce: [1; 24], ciphertext: vec![5; 200] }.into());
        assert!(matches!(decode_client(&encode_client(&msg), &limits), Err(DecodeError::PayloadTooLarge { .. })));
    }

    #[test]
    fn votes_with_too_many_parts_are_refused() {
        use crate::wire::{HashVote, VotePurpose};
        let limits = Limits { max_vote_parts: 4, ..Limits::default() };
        let vote = |parts| {
            ClientMessage::HashVote(HashVote { purpose: VotePurpose::Snapshot, time: 1, seq: 2, vote: [0; 32], parts })
        };
        assert!(decode_client(&encode_client(&vote(vec![[1; 32]; 4])), &limits).is_ok());
        assert_eq!(
            decode_client(&encode_client(&vote(vec![[1; 32]; 5])), &limits),
            Err(DecodeError::PayloadTooLarge { what: "vote parts", size: 5, limit: 4 })
        );
    }

    #[test]
    fn an_oversized_consensus_snapshot_is_refused() {
        let limits = Limits { max_snapshot_bytes: 100, ..Limits::default() };
        let record = |size| SnapshotRecord {
            time: 1,
            seq: 2,
            vote: [0; 32],
            data: Sealed { nonce: [0; 24], ciphertext: vec![7; size] },
            signature: crate::membership::MemberSignature::EMPTY,
        };
        // The limit covers the sealed data: its 24-byte nonce and the ciphertext.
        let fits = ServerMessage::Consensus(record(76));
        assert_eq!(decode_server(&encode_server(&fits), &limits).unwrap(), fits);
        assert_eq!(
            decode_server(&encode_server(&ServerMessage::Consensus(record(77))), &limits),
            Err(DecodeError::PayloadTooLarge { what: "snapshot", size: 101, limit: 100 })
        );
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let limits = Limits { max_frame_bytes: 10, ..Limits::default() };
        let frame = encode_client(&ClientMessage::Ping(1));
        assert!(decode_client(&frame, &limits).is_ok());
        let big = encode_client(&ClientMessage::Event(Sealed { nonce: [0; 24], ciphertext: vec![0; 10] }.into()));
        assert_eq!(decode_client(&big, &limits), Err(DecodeError::FrameTooLarge { size: big.len(), limit: 10 }));
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(decode_client(&trailing, &limits), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn client_and_server_frames_are_not_interchangeable() {
        let limits = Limits::default();
        let frame = encode_server(&ServerMessage::Tick { time: 5, seq: 1 });
        assert_eq!(decode_server(&frame, &limits).unwrap(), ServerMessage::Tick { time: 5, seq: 1 });
        let chunk = encode_chunk(&split(1, b"abc", 2)[0]);
        assert_eq!(decode_client(&chunk, &limits), Err(DecodeError::BadMagic));
        assert_eq!(decode_chunk(&frame, &limits), Err(DecodeError::BadMagic));
    }

    #[test]
    fn large_frame_travels_in_chunks() {
        let limits = Limits::default();
        let record = SnapshotRecord {
            time: 7,
            seq: 9,
            vote: [3; 32],
            data: Sealed { nonce: [1; 24], ciphertext: (0..300_000).map(|i| i as u8).collect() },
            signature: crate::membership::MemberSignature::EMPTY,
        };
        let msg = ClientMessage::SnapshotUpload(record);
        let frame = encode_client(&msg);
        let messages = split_frame(frame.clone(), 42, 16 * 1024);
        assert!(messages.len() > 10 && messages.iter().all(|m| m.len() <= 16 * 1024));
        let mut defrag = Defragmenter::new(&limits);
        let mut out = None;
        for m in messages.iter().rev() {
            assert!(out.is_none());
            out = defrag.push(m).unwrap().map(Cow::into_owned);
        }
        assert_eq!(decode_client(&out.unwrap(), &limits).unwrap(), msg);
        assert_eq!(defrag.in_flight_bytes(), 0);
        // A small frame passes through untouched.
        let ping = encode_client(&ClientMessage::Ping(3));
        assert_eq!(split_frame(ping.clone(), 1, 1000), vec![ping.clone()]);
        assert!(matches!(defrag.push(&ping).unwrap(), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn bad_chunk_frames_are_refused() {
        let limits = Limits { max_chunks: 4, ..Limits::default() };
        let mut defrag = Defragmenter::new(&limits);
        let many = split_frame(vec![0; 1000], 1, CHUNK_FRAME_OVERHEAD + 100);
        assert!(matches!(defrag.push(&many[0]), Err(FrameError::Decode(DecodeError::Malformed(_)))));
        let mut roomy = Defragmenter::new(&Limits::default());
        let nested = split_frame(encode_chunk(&split(1, b"x", 1)[0]), 2, 5);
        assert!(nested.len() > 1);
        let results: Vec<_> = nested.iter().map(|m| roomy.push(m).map(|f| f.map(Cow::into_owned))).collect();
        assert_eq!(results.last().unwrap(), &Err(FrameError::NestedChunk));
        let twice = split_frame(vec![0; 100], 3, CHUNK_FRAME_OVERHEAD + 40);
        defrag.push(&twice[0]).unwrap();
        assert!(matches!(defrag.push(&twice[0]), Err(FrameError::Chunk(ChunkError::Duplicate { .. }))));
        for cut in 2..twice[1].len() {
            assert!(defrag.push(&twice[1][..cut]).is_err(), "truncated at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let limits = Limits::default();
            let _ = decode_client(&bytes, &limits);
            let _ = decode_server(&bytes, &limits);
            let _ = decode_chunk(&bytes, &limits);
            let mut with_header = b"SQ\x01\x00".to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = decode_client(&with_header, &limits);
            let _ = decode_server(&with_header, &limits);
            with_header[1] = b'C';
            let _ = Defragmenter::new(&limits).push(&with_header);
        }
    }
}
