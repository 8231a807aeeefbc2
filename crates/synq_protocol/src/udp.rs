//! The UDP wire both ends must agree on: renet's channel layout and netcode's protocol id; and
//! the socket buffers both ends ask for.
//!
//! Clients (`bevy_synq`'s UDP transport) and the reflector (`synq_reflector::server`) build their
//! renet connections from [`connection_config`], so a game links these few definitions and not
//! the server.
//!
//! One renet channel, [`CHANNEL`], reliable and ordered, in each direction; every renet message is
//! exactly one codec frame ([`crate::codec::encode_client`] / [`crate::codec::encode_server`]).
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

use std::time::Duration;

use renet::{ChannelConfig, ConnectionConfig, SendType};

/// The renet channel every bevy_synq message travels on (reliable, ordered), in both directions.
pub const CHANNEL: u8 = 0;

/// How many bytes one direction of one connection may hold in flight; also the largest frame this
/// transport carries (64 MiB).
pub const CHANNEL_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// The netcode protocol id used when none is configured (`"SYNQ"` and a format number). Clients
/// and the reflector must agree on it; a mismatch looks like an unreachable server.
pub const DEFAULT_PROTOCOL_ID: u64 = 0x5359_4e51_0000_0001;

/// Bytes renet may send per connection per update. The reflector updates ≈1,000 times a second
/// (≈16 MB/s per client); a client's network thread updates at least every millisecond or two.
const BYTES_PER_TICK: u64 = 16 * 1024;

/// The renet connection configuration both the reflector and its clients must use: one reliable,
/// ordered channel ([`CHANNEL`]) of [`CHANNEL_MEMORY_BYTES`] in each direction.
pub fn connection_config() -> ConnectionConfig {
    let channel = ChannelConfig {
        channel_id: CHANNEL,
        max_memory_usage_bytes: CHANNEL_MEMORY_BYTES,
        send_type: SendType::ReliableOrdered { resend_time: Duration::from_millis(100) },
    };
    ConnectionConfig {
        available_bytes_per_tick: BYTES_PER_TICK,
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
