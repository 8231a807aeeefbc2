//! The UDP wire both ends must agree on: renet's channel layout and netcode's protocol id; and
//! the socket buffers both ends ask for.
//!
//! Clients (`bevy_synq`'s UDP transport) and the reflector (`synq_reflector::server`) build their
//! renet connections from [`connection_config`], so a game links these few definitions and not
//! the server.
//!
//! One renet channel, [`CHANNEL`], reliable and ordered, in each direction, carries every message
//! but the reflector's ticks ([below](#ticks)); every renet message is exactly one codec frame ([`crate::codec::encode_client`] / [`crate::codec::encode_server`]).
//! renet splits a message into slices of about 1 KiB and reassembles it, so a frame may be as
//! large as the channel's memory, [`CHANNEL_MEMORY_BYTES`]: that is the largest snapshot or `Sync`
//! this transport carries, below the codec's own [`crate::Limits::max_frame_bytes`].
//!
//! ```
//! use synq_protocol::udp::{CHANNEL, connection_config};
//!
//! let config = connection_config();
//! assert_eq!(config.server_channels_config[0].channel_id, CHANNEL);
//! ```
//!
//! # Ticks
//!
//! Heartbeat ticks ([`ServerMessage::Tick`]) do not travel on the channel. Each is one netcode
//! payload of its own: the byte [`TICK_PAYLOAD`] (no renet packet type starts with it), then the
//! tick's codec frame ([`tick_payload`], [`tick_frame`]). No renet bookkeeping on either end, no
//! acknowledgement, no resend: a lost tick is replaced by the next one. A tick may therefore
//! overtake events sent before it; the sequence number it carries tells the client whether it
//! holds everything the tick vouches for (see [`ServerMessage::Tick`]). An idle session then
//! costs one datagram per client per tick and nothing more, where a tick on the channel cost
//! renet's records on both ends and an acknowledgement datagram back.
//!
//! ```
//! use synq_protocol::{Limits, ServerMessage, codec, udp};
//!
//! let payload = udp::tick_payload(&ServerMessage::Tick { time: 1_050, seq: 7 });
//! let frame = udp::tick_frame(&payload).expect("a tick datagram");
//! let tick = codec::decode_server(frame, &Limits::default()).unwrap();
//! assert_eq!(tick, ServerMessage::Tick { time: 1_050, seq: 7 });
//! assert!(udp::tick_frame(&[udp::RENET_ACK_PACKET, 0, 0]).is_none());
//! ```

use std::time::Duration;

use renet::{ChannelConfig, ConnectionConfig, SendType};

use crate::codec;
use crate::wire::ServerMessage;

mod client;

pub use client::ClientSocket;

/// The first byte of a netcode payload that carries a tick's codec frame instead of a renet
/// packet (renet's packet types are 0 to 4).
pub const TICK_PAYLOAD: u8 = 0xA7;

/// renet's packet type of an ack-only packet (the first byte of its payload): neither end answers
/// one with acks of its own.
pub const RENET_ACK_PACKET: u8 = 4;

/// The netcode payload of a tick datagram: [`TICK_PAYLOAD`] and the codec frame of `tick` (any
/// server message encodes, but only ticks are sent this way).
pub fn tick_payload(tick: &ServerMessage) -> Vec<u8> {
    let frame = codec::encode_server(tick);
    let mut payload = Vec::with_capacity(1 + frame.len());
    payload.push(TICK_PAYLOAD);
    payload.extend_from_slice(&frame);
    payload
}

/// The codec frame a tick datagram's netcode payload carries, or `None` for a renet packet.
pub fn tick_frame(payload: &[u8]) -> Option<&[u8]> {
    match payload.split_first() {
        Some((&TICK_PAYLOAD, frame)) => Some(frame),
        _ => None,
    }
}

/// The renet channel every bevy_synq message travels on (reliable, ordered), in both directions.
pub const CHANNEL: u8 = 0;

/// How many bytes one direction of one connection may hold in flight; also the largest frame this
/// transport carries (64 MiB).
pub const CHANNEL_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// The netcode protocol id used when none is configured (`"SYNQ"` and a format number). Clients
/// and the reflector must agree on it; a mismatch looks like an unreachable server.
pub const DEFAULT_PROTOCOL_ID: u64 = 0x5359_4e51_0000_0001;

/// Bytes renet may send on one connection per flush (renet's `available_bytes_per_tick`): the
/// largest burst of datagrams one flush puts on the wire for one connection, 512 KiB.
///
/// renet has no congestion control: it sends what is queued, up to this, at every flush, and
/// sends again what is not acknowledged 100 ms later. The reflector flushes a connection as soon
/// as it queued a message for it; when a flush used most of this allowance, it flushes again as
/// soon as the client acknowledges anything (clients acknowledge within 10 ms), so a large `Sync`
/// (a late joiner's snapshot and the events since) moves in bursts of this size clocked by the
/// client's acks: a 10k-entity `Sync` (≈ 0.2 MB) in one burst, a 100k-entity one (≈ 2.1 MB) in
/// five. (At 16 KiB, the value before, a `Sync` moved at ≈ 0.8 MB/s.)
///
/// A burst must fit the receiving socket's buffer, or the rest is dropped and resent 100 ms later:
/// both ends ask for [`SOCKET_BUFFER_BYTES`] (4 MiB, which Linux doubles for its bookkeeping,
/// where `net.core.rmem_max` allows it) and drain it on their network thread as it fills.
///
/// Memory stays bounded by the channel memory, not by this: one direction of one connection holds
/// at most [`CHANNEL_MEMORY_BYTES`] of unacknowledged messages (sends) or incomplete ones
/// (receives), so what a client can make the reflector buffer is unchanged; this only sets how
/// fast that memory drains. renet's record of sent packets (kept 3 s, or until acknowledged) grows
/// with the rate: at most ≈ 10 resends a second of what is unacknowledged.
pub const BYTES_PER_FLUSH: u64 = 512 * 1024;

/// The renet connection configuration both the reflector and its clients must use: one reliable,
/// ordered channel ([`CHANNEL`]) of [`CHANNEL_MEMORY_BYTES`] in each direction, and
/// [`BYTES_PER_FLUSH`] per flush. Only the channels must agree between the two ends: each end's
/// per-flush allowance applies to what it sends (bevy_synq's client, which flushes every
/// millisecond while it has more to send, uses a smaller one).
pub fn connection_config() -> ConnectionConfig {
    let channel = ChannelConfig {
        channel_id: CHANNEL,
        max_memory_usage_bytes: CHANNEL_MEMORY_BYTES,
        send_type: SendType::ReliableOrdered { resend_time: Duration::from_millis(100) },
    };
    ConnectionConfig {
        available_bytes_per_tick: BYTES_PER_FLUSH,
        server_channels_config: vec![channel.clone()],
        client_channels_config: vec![channel],
    }
}

/// The socket buffer size both ends ask for: the default (≈ 208 KiB on Linux) holds only a few
/// milliseconds of a large `Sync` arriving at full speed, or of a busy reflector's traffic, and a
/// scheduling gap then drops datagrams (each costing a renet resend).
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Asks for [`SOCKET_BUFFER_BYTES`] of receive and send buffer on `socket` (the kernel may cap it
/// silently, e.g. at `net.core.rmem_max` on Linux). Returns the options that could not be set,
/// with the OS's error, for the caller to log. Nothing is done on non-Unix systems.
///
/// ```
/// let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
/// assert!(synq_protocol::udp::enlarge_socket_buffers(&socket).is_empty());
/// ```
pub fn enlarge_socket_buffers(socket: &std::net::UdpSocket) -> Vec<(&'static str, std::io::Error)> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let size = SOCKET_BUFFER_BYTES as libc::c_int;
        let mut failed = Vec::new();
        for (option, name) in [(libc::SO_RCVBUF, "SO_RCVBUF"), (libc::SO_SNDBUF, "SO_SNDBUF")] {
            // SAFETY: a valid socket descriptor and a pointer to a c_int of the size given.
            let result = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if result != 0 {
                failed.push((name, std::io::Error::last_os_error()));
            }
        }
        failed
    }
    #[cfg(not(unix))]
    {
        let _ = socket;
        Vec::new()
    }
}
