//! # synq_protocol
//!
//! Everything that two parties of a bevy_synq session must agree on byte for byte, with no Bevy
//! dependency: session identity and hashing ([`ids`], [`code_hash`]), [`canonical_json`] for
//! hashed and persisted documents, end-to-end encryption ([`crypto`]), join [`link`]s, and the
//! messages exchanged between clients and the reflector ([`wire`]) with their bounded binary
//! [`codec`] and the [`chunk`]ing of frames larger than one transport message, and the
//! [`membership`] proofs with which clients show the reflector that they hold the password; with
//! the `udp` feature, the renet channel layout both ends of the UDP transport use (`udp`).
//!
//! The reflector links this crate too, but it only ever handles [`crypto::Sealed`] payloads: it has
//! no key and therefore never sees plaintext.
#![deny(missing_docs)]

pub mod canonical_json;
pub mod chunk;
pub mod code_hash;
pub mod codec;
pub mod crypto;
pub mod ids;
pub mod limits;
pub mod link;
pub mod membership;
pub mod netcode_guard;
#[cfg(feature = "udp")]
pub mod udp;
pub mod wire;

pub use code_hash::CodeHasher;
pub use ids::{AppId, CodeHash, Hash32, IdOptions, PersistentId, SessionId, SessionName, ViewId};
pub use limits::Limits;
pub use wire::{ClientMessage, ServerMessage};

/// The version of the client ⇄ reflector protocol spoken by this crate.
///
/// A reflector refuses a `Join` that names another version with
/// [`wire::ErrorCode::ProtocolVersion`].
pub const PROTOCOL_VERSION: u16 = 4;

/// The first external sequence number a session hands out is `INITIAL_SEQ + 1`.
///
/// As in Croquet, the counter starts just below the 32-bit wrap so that every session (and every
/// test) exercises wrap-around within its first sixteen messages.
pub const INITIAL_SEQ: u32 = 0xFFFF_FFF0;

/// Wrap-around comparison of 32-bit sequence numbers: `true` when `a` comes before `b`, or is
/// equal to it.
///
/// Valid while the two numbers are less than 2³¹ apart, which the bounded event buffer guarantees.
///
/// ```
/// use synq_protocol::seq_le;
/// assert!(seq_le(0xFFFF_FFFF, 0));
/// assert!(!seq_le(3, 0xFFFF_FFF0));
/// assert!(seq_le(7, 7));
/// ```
pub fn seq_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}
