//! The bounded binary encoding of [`ClientMessage`] and [`ServerMessage`].
//!
//! Frames are `b"SQ"`, the protocol version (u16, little endian), then the postcard encoding of
//! the message. postcard was chosen over bincode because its format is specified and stable, it
//! is compact (varints), and its deserializer never trusts a length prefix for an allocation
//! beyond the bytes actually present. Every decode checks the frame size first and the payload
//! limits after, and returns a [`DecodeError`] on anything else.

use crate::limits::Limits;
use crate::wire::{ClientMessage, EventBody, ServerMessage, SyncStart};
use crate::PROTOCOL_VERSION;
use serde::Serialize;

const MAGIC: &[u8; 2] = b"SQ";
const HEADER: usize = 4;

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
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
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
    if frame.len() > limits.max_frame_bytes {
        return Err(DecodeError::FrameTooLarge { size: frame.len(), limit: limits.max_frame_bytes });
    }
    if frame.len() < HEADER || &frame[..2] != MAGIC {
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
        ClientMessage::Event(sealed) => check("event payload", sealed.len(), limits.max_event_bytes)?,
        ClientMessage::SnapshotUpload(record) => check("snapshot", record.data.len(), limits.max_snapshot_bytes)?,
        ClientMessage::PersistUpload(record) => check("persisted data", record.data.len(), limits.max_persist_bytes)?,
        ClientMessage::Join(join) => {
            check("app id", join.app_id.len(), 256)?;
            check("api key", join.api_key.as_ref().map_or(0, String::len), 1024)?;
            check("password check", join.password_check.len(), 1024)?;
        }
        ClientMessage::HashVote(_) | ClientMessage::Ping(_) | ClientMessage::Leave => {}
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
                SyncStart::Fresh { persisted: Some(record) } => {
                    check("persisted data", record.data.len(), limits.max_persist_bytes)?
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Sealed;

    #[test]
    fn round_trip_and_garbage() {
        let limits = Limits::default();
        let msg = ClientMessage::Event(Sealed { nonce: [1; 24], ciphertext: vec![5; 40] });
        let frame = encode_client(&msg);
        assert_eq!(decode_client(&frame, &limits).unwrap(), msg);
        for cut in 0..frame.len() {
            assert!(decode_client(&frame[..cut], &limits).is_err(), "truncated at {cut}");
        }
        assert_eq!(decode_client(b"XX\x01\x00", &limits), Err(DecodeError::BadMagic));
        assert_eq!(decode_client(b"SQ\x09\x00\x00", &limits), Err(DecodeError::Version(9)));
    }

    #[test]
    fn oversized_event_is_refused() {
        let limits = Limits { max_event_bytes: 100, ..Limits::default() };
        let msg = ClientMessage::Event(Sealed { nonce: [1; 24], ciphertext: vec![5; 200] });
        assert!(matches!(decode_client(&encode_client(&msg), &limits), Err(DecodeError::PayloadTooLarge { .. })));
    }
}
