//! A bounded validator for netcode datagrams, run on every datagram before it reaches
//! `renetcode` (the netcode implementation under renet), on the reflector and on the client.
//!
//! # Why
//!
//! renetcode 2.0.0 panics on some malformed datagrams instead of returning an error:
//!
//! - the high nibble of the prefix byte is the number of sequence bytes, and renetcode reads them
//!   into an 8-byte array without checking the count: `[0x95, …]` panics (`range end index 9 out
//!   of range for slice of length 8`);
//! - once the sequence is read, the rest must hold at least the 16-byte MAC, which is not checked
//!   either: `[0x85]` followed by 17 zero bytes panics (`mid > len`) as soon as it comes from an
//!   address that has a key (anyone who completed a handshake, since the reflector runs netcode's
//!   unsecure mode), or is spoofed from the reflector's address to a client.
//!
//! Every failed datagram also costs an error log line inside renetcode, which an attacker turns
//! into gigabytes of logs.
//!
//! This module checks exactly what renetcode needs so that it never indexes out of bounds, plus
//! the exact sizes that netcode 1.02 (as renetcode writes it) gives each packet type, and which
//! types each side may receive. It is a small parser we own, tested and fuzzed
//! (`crates/synq_reflector/fuzz`), with no renet dependency. We validate in front of renetcode
//! rather than fork it: a fork would have to be maintained and kept in step with renet, while
//! this check costs a few comparisons per datagram. The bounds checks belong in renetcode itself
//! and should be offered upstream; this guard stays useful as a cheap filter even then.
//!
//! # Format (renetcode 2.0.0, netcode 1.02)
//!
//! A connection request is the prefix byte `0x00` and 1077 plaintext bytes (version info,
//! protocol id, expire timestamp, nonce, encrypted private token): 1078 bytes in all. Every other
//! packet is `prefix, sequence (0..=8 bytes, little endian), encrypted body, 16-byte MAC`, where
//! the prefix's low nibble is the packet type and its high nibble the number of sequence bytes.
//! renetcode writes sequence 0 with *zero* bytes (the netcode standard says one at least), so a
//! count of 0 is accepted. renetcode refuses anything shorter than 18 bytes itself.

use std::fmt;

/// Bytes of the authentication tag that ends every encrypted netcode packet.
pub const MAC_BYTES: usize = 16;

/// The largest datagram netcode produces or accepts (renetcode's `NETCODE_MAX_PACKET_BYTES`); a
/// receive buffer of this size is enough, since every datagram the guard accepts is smaller.
pub const MAX_DATAGRAM_BYTES: usize = 1400;

/// The largest payload one netcode payload packet carries (renetcode's
/// `NETCODE_MAX_PAYLOAD_BYTES`).
pub const MAX_PAYLOAD_BYTES: usize = 1300;

/// The exact size of a connection request: prefix, version info (13), protocol id (8), expire
/// timestamp (8), nonce (24) and the encrypted private connect token (1024).
pub const CONNECTION_REQUEST_BYTES: usize = 1 + 13 + 8 + 8 + 24 + 1024;

/// The smallest datagram renetcode looks at (it refuses shorter ones with an error).
pub const MIN_DATAGRAM_BYTES: usize = 2 + MAC_BYTES;

/// The encrypted body of a challenge or a response: token sequence (8) and token (300).
const CHALLENGE_BODY_BYTES: usize = 8 + 300;

/// The encrypted body of a keep-alive: client index (4) and max clients (4).
const KEEP_ALIVE_BODY_BYTES: usize = 8;

/// The netcode packet types (the prefix byte's low nibble).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// A client asks to connect (plaintext envelope around an encrypted token); client → server.
    ConnectionRequest,
    /// The server refuses a connection; server → client.
    ConnectionDenied,
    /// The server's challenge; server → client.
    Challenge,
    /// The client's answer to a challenge; client → server.
    Response,
    /// Keeps a connection alive; both directions.
    KeepAlive,
    /// Carries a renet packet; both directions.
    Payload,
    /// Ends a connection; both directions.
    Disconnect,
}

impl PacketKind {
    fn from_nibble(nibble: u8) -> Option<Self> {
        Some(match nibble {
            0 => Self::ConnectionRequest,
            1 => Self::ConnectionDenied,
            2 => Self::Challenge,
            3 => Self::Response,
            4 => Self::KeepAlive,
            5 => Self::Payload,
            6 => Self::Disconnect,
            _ => return None,
        })
    }

    /// The allowed sizes of the encrypted body (between the sequence bytes and the MAC).
    fn body_bytes(self) -> (usize, usize) {
        match self {
            // A connection request has no encrypted body (its size is checked on its own).
            Self::ConnectionRequest | Self::ConnectionDenied | Self::Disconnect => (0, 0),
            Self::Challenge | Self::Response => (CHALLENGE_BODY_BYTES, CHALLENGE_BODY_BYTES),
            Self::KeepAlive => (KEEP_ALIVE_BODY_BYTES, KEEP_ALIVE_BODY_BYTES),
            // renet never sends an empty packet.
            Self::Payload => (1, MAX_PAYLOAD_BYTES),
        }
    }
}

/// Why a datagram was refused. Each value is a cause worth counting separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// Shorter than [`MIN_DATAGRAM_BYTES`].
    TooShort,
    /// Longer than any packet of its type (or than [`MAX_DATAGRAM_BYTES`]).
    TooLong,
    /// The prefix names no netcode packet type, or more than 8 sequence bytes.
    BadPrefix,
    /// A packet type this side never receives (e.g. a challenge sent to the server).
    WrongDirection(PacketKind),
    /// The size does not match the packet type.
    WrongSize(PacketKind),
}

impl Rejected {
    /// A short, stable name for the cause, for counters and logs.
    pub fn cause(self) -> &'static str {
        match self {
            Self::TooShort => "too short",
            Self::TooLong => "too long",
            Self::BadPrefix => "bad prefix",
            Self::WrongDirection(_) => "wrong direction",
            Self::WrongSize(_) => "wrong size",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongDirection(kind) | Self::WrongSize(kind) => write!(f, "{} ({kind:?})", self.cause()),
            _ => f.write_str(self.cause()),
        }
    }
}

impl std::error::Error for Rejected {}

/// Which side receives the datagram.
#[derive(Clone, Copy)]
enum Receiver {
    Server,
    Client,
}

/// Checks a datagram received by a netcode *server*: a connection request, response,
/// keep-alive, payload or disconnect of the right size. What passes cannot make renetcode 2.0.0
/// index out of bounds.
///
/// ```
/// use synq_protocol::netcode_guard::{Rejected, check_server_bound};
/// let mut crash = [0u8; 18];
/// crash[0] = 0x85;
/// assert!(check_server_bound(&crash).is_err());
/// assert_eq!(check_server_bound(&[0x05; 4]), Err(Rejected::TooShort));
/// ```
pub fn check_server_bound(datagram: &[u8]) -> Result<PacketKind, Rejected> {
    check(datagram, Receiver::Server)
}

/// Checks a datagram received by a netcode *client*: a connection denied, challenge,
/// keep-alive, payload or disconnect of the right size. What passes cannot make renetcode 2.0.0
/// index out of bounds.
pub fn check_client_bound(datagram: &[u8]) -> Result<PacketKind, Rejected> {
    check(datagram, Receiver::Client)
}

fn check(datagram: &[u8], receiver: Receiver) -> Result<PacketKind, Rejected> {
    if datagram.len() < MIN_DATAGRAM_BYTES {
        return Err(Rejected::TooShort);
    }
    if datagram.len() > MAX_DATAGRAM_BYTES {
        return Err(Rejected::TooLong);
    }
    let prefix = datagram[0];
    let kind = PacketKind::from_nibble(prefix & 0x0F).ok_or(Rejected::BadPrefix)?;
    let sequence_bytes = usize::from(prefix >> 4);
    if sequence_bytes > 8 {
        return Err(Rejected::BadPrefix);
    }
    if let (Receiver::Server, PacketKind::ConnectionDenied | PacketKind::Challenge)
    | (Receiver::Client, PacketKind::ConnectionRequest | PacketKind::Response) = (receiver, kind)
    {
        return Err(Rejected::WrongDirection(kind));
    }
    if kind == PacketKind::ConnectionRequest {
        // Its prefix is exactly 0: no sequence, and the rest is a fixed-size plaintext envelope.
        if prefix != 0 {
            return Err(Rejected::BadPrefix);
        }
        return match datagram.len() {
            CONNECTION_REQUEST_BYTES => Ok(kind),
            n if n < CONNECTION_REQUEST_BYTES => Err(Rejected::WrongSize(kind)),
            _ => Err(Rejected::TooLong),
        };
    }
    // At least the sequence and the MAC follow the prefix; what lies between is the body.
    let Some(body) = datagram.len().checked_sub(1 + sequence_bytes + MAC_BYTES) else {
        return Err(Rejected::WrongSize(kind));
    };
    let (min, max) = kind.body_bytes();
    if body < min {
        Err(Rejected::WrongSize(kind))
    } else if body > max {
        Err(Rejected::TooLong)
    } else {
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(prefix: u8, sequence_bytes: usize, body: usize) -> Vec<u8> {
        let mut datagram = vec![prefix];
        datagram.resize(1 + sequence_bytes + body + MAC_BYTES, 0xA5);
        datagram
    }

    #[test]
    fn the_crash_datagrams_are_refused_on_both_sides() {
        for first in [0x85u8, 0x95] {
            let mut crash = vec![first];
            crash.extend_from_slice(&[0; 17]);
            assert!(check_server_bound(&crash).is_err(), "{first:#x} to the server");
            assert!(check_client_bound(&crash).is_err(), "{first:#x} to the client");
        }
        let mut crash = vec![0x85];
        crash.extend_from_slice(&[0; 17]);
        assert_eq!(check_server_bound(&crash), Err(Rejected::WrongSize(PacketKind::Payload)));
        let mut crash = vec![0x95];
        crash.extend_from_slice(&[0; 17]);
        assert_eq!(check_server_bound(&crash), Err(Rejected::BadPrefix));
    }

    #[test]
    fn every_sequence_length_above_eight_is_refused() {
        for nibble in 9..=15u8 {
            for kind in 1..=6u8 {
                let datagram = packet(nibble << 4 | kind, 8, 308);
                assert_eq!(check_server_bound(&datagram), Err(Rejected::BadPrefix));
                assert_eq!(check_client_bound(&datagram), Err(Rejected::BadPrefix));
            }
        }
    }

    #[test]
    fn unknown_types_are_refused() {
        for kind in 7..=15u8 {
            assert_eq!(check_server_bound(&packet(0x10 | kind, 1, 8)), Err(Rejected::BadPrefix));
            assert_eq!(check_client_bound(&packet(0x10 | kind, 1, 8)), Err(Rejected::BadPrefix));
        }
    }

    #[test]
    fn well_formed_packets_pass_in_their_direction_only() {
        for sequence_bytes in 0..=8usize {
            let s = (sequence_bytes as u8) << 4;
            assert_eq!(check_server_bound(&packet(s | 3, sequence_bytes, 308)), Ok(PacketKind::Response));
            assert_eq!(check_client_bound(&packet(s | 2, sequence_bytes, 308)), Ok(PacketKind::Challenge));
            assert_eq!(check_client_bound(&packet(s | 1, sequence_bytes, 0)).is_ok(), sequence_bytes >= 1);
            for side in [check_server_bound, check_client_bound] {
                assert_eq!(side(&packet(s | 4, sequence_bytes, 8)), Ok(PacketKind::KeepAlive));
                assert_eq!(side(&packet(s | 5, sequence_bytes, 1)), Ok(PacketKind::Payload));
                assert_eq!(side(&packet(s | 5, sequence_bytes, MAX_PAYLOAD_BYTES)), Ok(PacketKind::Payload));
                assert_eq!(side(&packet(s | 5, sequence_bytes, MAX_PAYLOAD_BYTES + 1)), Err(Rejected::TooLong));
                assert_eq!(side(&packet(s | 4, sequence_bytes, 7)), Err(Rejected::WrongSize(PacketKind::KeepAlive)));
                assert_eq!(side(&packet(s | 4, sequence_bytes, 9)), Err(Rejected::TooLong));
            }
            assert_eq!(
                check_server_bound(&packet(s | 2, sequence_bytes, 308)),
                Err(Rejected::WrongDirection(PacketKind::Challenge))
            );
            assert_eq!(
                check_client_bound(&packet(s | 3, sequence_bytes, 308)),
                Err(Rejected::WrongDirection(PacketKind::Response))
            );
        }
    }

    #[test]
    fn a_connection_request_has_one_size_and_goes_to_the_server() {
        let request = vec![0u8; CONNECTION_REQUEST_BYTES];
        assert_eq!(check_server_bound(&request), Ok(PacketKind::ConnectionRequest));
        assert_eq!(check_client_bound(&request), Err(Rejected::WrongDirection(PacketKind::ConnectionRequest)));
        assert_eq!(
            check_server_bound(&request[..CONNECTION_REQUEST_BYTES - 1]),
            Err(Rejected::WrongSize(PacketKind::ConnectionRequest))
        );
        let mut long = request.clone();
        long.push(0);
        assert_eq!(check_server_bound(&long), Err(Rejected::TooLong));
        let mut prefixed = request;
        prefixed[0] = 0x10;
        assert_eq!(check_server_bound(&prefixed), Err(Rejected::BadPrefix));
    }

    #[test]
    fn sizes_outside_the_datagram_bounds_are_refused() {
        for len in 0..MIN_DATAGRAM_BYTES {
            assert_eq!(check_server_bound(&vec![0x05; len]), Err(Rejected::TooShort));
            assert_eq!(check_client_bound(&vec![0x05; len]), Err(Rejected::TooShort));
        }
        assert_eq!(check_server_bound(&vec![0x05; MAX_DATAGRAM_BYTES + 1]), Err(Rejected::TooLong));
    }

    #[test]
    fn whatever_passes_leaves_room_for_the_sequence_and_the_mac() {
        // Exhaustive over every prefix and every length up to the maximum.
        let mut datagram = vec![0u8; MAX_DATAGRAM_BYTES + 1];
        for prefix in 0..=255u8 {
            datagram[0] = prefix;
            for len in 0..=datagram.len() {
                for side in [check_server_bound, check_client_bound] {
                    if side(&datagram[..len]).is_ok() && prefix != 0 {
                        let sequence_bytes = usize::from(prefix >> 4);
                        assert!(sequence_bytes <= 8);
                        assert!(len >= MIN_DATAGRAM_BYTES && len >= 1 + sequence_bytes + MAC_BYTES);
                        assert!(len <= MAX_DATAGRAM_BYTES);
                    }
                }
            }
        }
    }
}
