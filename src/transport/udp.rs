//! The network transport: a reflector reached over UDP (renet + netcode), as served by
//! `synq-reflector` or `synq_reflector::server::UdpReflector`.
//!
//! ```no_run
//! use bevy_synq::prelude::*;
//! use bevy_synq::transport::udp::UdpConnector;
//! use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
//!
//! let connector = UdpConnector::new("127.0.0.1:5800".parse().unwrap(), DEFAULT_PROTOCOL_ID);
//! let target = ReflectorTarget::custom(connector.with_connect_timeout(std::time::Duration::from_secs(2)));
//! ```
//!
//! # A network thread per connection
//!
//! Each [`UdpConnection`] owns a thread, named `synq-udp`, that does all the socket work: it
//! receives datagrams, advances netcode and renet, sends what the app queued, acknowledges what
//! arrived, resends what was lost and keeps the connection alive. The app only exchanges ready
//! values with it over two channels:
//!
//! - app → thread: encoded client frames ([`Connection::send`] encodes and returns at once);
//! - thread → app: decoded server messages (decoded on the thread, within the connector's
//!   [`Limits`]), then, once the connection is closed, the reason why.
//!
//! So the connection stays healthy while the app does not run frames: a frame that stalls for
//! seconds (loading, a minimised window, a reactive update mode) neither stops the acks and
//! keep-alives the reflector expects nor lets a large `Sync` overflow the socket; what arrives
//! meanwhile waits, decoded, for the next [`Connection::poll`].
//!
//! The thread waits for a datagram with `poll(2)` (on other platforms it sleeps) for at most a
//! millisecond, then takes every frame the app queued, so a frame leaves within about a
//! millisecond of [`Connection::send`]. Acknowledgements alone are flushed every few
//! milliseconds rather than on every wake-up, so a busy download does not turn into a stream of
//! ack-only datagrams. The socket asks for 4 MiB receive and send buffers on unix.
//!
//! Dropping a [`UdpConnection`] closes the channel to the thread: the thread sends what was
//! queued (such as the session's `Leave`), waits up to 100 ms for the reflector to acknowledge
//! it, sends netcode's disconnect packet and ends; the drop waits for that. The thread also ends
//! on its own if the app side disappears.
//!
//! Transport-level security is netcode's *unsecure* mode: the payloads that matter are sealed
//! end to end before they get here.
//!
//! The socket is read by this module rather than by `renet_netcode`'s client transport, so that
//! every datagram can be checked first: only datagrams from the reflector's address that pass
//! [`synq_protocol::netcode_guard::check_client_bound`] reach renetcode, whose parser panics on
//! some malformed datagrams (anyone can spoof the reflector's address).

mod worker;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::udp::CHANNEL_MEMORY_BYTES;
use synq_protocol::wire::{ClientMessage, ServerMessage};

use super::{Connection, Connector};
use worker::{Inbound, Shared, State, Worker};

/// How long a dropped connection's thread may keep trying to get the frames queued before the
/// drop (such as the session's `Leave`) acknowledged by the reflector.
const LINGER: Duration = Duration::from_millis(100);

/// How long a drop waits for the thread to end before leaving it to finish alone.
const DROP_WAIT: Duration = Duration::from_millis(250);

/// Opens [`UdpConnection`]s to a reflector at a UDP address.
#[derive(Clone, Debug)]
pub struct UdpConnector {
    /// Where the next connection goes: one of `addresses`.
    server_addr: SocketAddr,
    /// Every reflector this connector may reach, in the order they are tried.
    addresses: Vec<SocketAddr>,
    protocol_id: u64,
    limits: Limits,
    connect_timeout: Duration,
    /// The last connection's shared state: whether it was ever established.
    last: Option<Arc<Shared>>,
}

impl UdpConnector {
    /// Connects to the reflector at `server_addr`, which must use the same netcode `protocol_id`
    /// (usually [`synq_protocol::udp::DEFAULT_PROTOCOL_ID`]).
    pub fn new(server_addr: SocketAddr, protocol_id: u64) -> Self {
        Self {
            server_addr,
            addresses: vec![server_addr],
            protocol_id,
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(5),
            last: None,
        }
    }

    /// Other reflectors of the same cluster (see `docs/cluster.md`), tried in order after the
    /// first when a connection cannot be established: a client that lost its reflector reaches
    /// another one, which serves the session or sends the client to the one that does
    /// ([`ServerMessage::Redirect`]).
    ///
    /// ```
    /// use bevy_synq::transport::udp::UdpConnector;
    /// use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
    ///
    /// let edges = ["10.0.0.1:5800".parse().unwrap(), "10.0.0.2:5800".parse().unwrap()];
    /// let connector = UdpConnector::new(edges[0], DEFAULT_PROTOCOL_ID).with_fallbacks(edges);
    /// assert_eq!(connector.addresses(), &edges);
    /// ```
    pub fn with_fallbacks(mut self, addresses: impl IntoIterator<Item = SocketAddr>) -> Self {
        for address in addresses {
            if !self.addresses.contains(&address) {
                self.addresses.push(address);
            }
        }
        self
    }

    /// Every reflector this connector may reach, in the order they are tried.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Decodes the reflector's frames within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a connection may take to be established before it is reported lost (default 5 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

impl Connector for UdpConnector {
    /// Opens a connection to the current reflector; when the previous connection was never
    /// established (no reflector answered there), to the next of [`UdpConnector::addresses`].
    fn connect(&mut self) -> Result<Box<dyn Connection>, String> {
        if self.last.take().is_some_and(|last| !last.was_established()) {
            self.try_another();
        }
        let connection = UdpConnection::open(self)?;
        self.last = Some(connection.shared.clone());
        Ok(Box::new(connection))
    }

    fn describe(&self) -> String {
        format!("the reflector at udp://{}", self.server_addr)
    }

    /// The next connection goes to the next of [`UdpConnector::addresses`] (after the last, the
    /// first).
    fn try_another(&mut self) {
        if self.addresses.len() > 1 {
            let at = self.addresses.iter().position(|a| *a == self.server_addr).unwrap_or(0);
            self.server_addr = self.addresses[(at + 1) % self.addresses.len()];
            self.last = None;
            tracing::info!("bevy_synq: trying the reflector at udp://{}", self.server_addr);
        }
    }

    /// The next connection goes to `to` (added to [`UdpConnector::addresses`] if new).
    fn redirect(&mut self, to: SocketAddr) -> Result<(), String> {
        if !self.addresses.contains(&to) {
            self.addresses.push(to);
        }
        self.server_addr = to;
        self.last = None;
        Ok(())
    }
}

/// One connection to a UDP reflector, served by its own network thread (see the
/// [module documentation](self)).
///
/// [`Connection::send`] queues an encoded frame for the thread, which sends it within about a
/// millisecond; [`Connection::poll`] hands out the messages the thread received and decoded,
/// however long ago, and then the reason the connection closed. Dropping it sends what was
/// queued, then tells the reflector at once; the drop waits a few tens of milliseconds at most
/// (see [`Drop`](#impl-Drop-for-UdpConnection)).
pub struct UdpConnection {
    /// Encoded frames for the thread; `None` once dropped (which tells the thread to finish).
    outgoing: Option<Sender<Vec<u8>>>,
    /// Decoded messages from the thread, then why the connection closed.
    incoming: Receiver<Inbound>,
    /// What the thread publishes for the app: connection state, RTT, send budget.
    shared: Arc<Shared>,
    /// Why the connection is closed, once the app has seen it.
    closed: Option<String>,
    thread: Option<JoinHandle<()>>,
}

impl UdpConnection {
    /// Opens the socket and starts the network thread, which sends the first connection request
    /// at once. Fails only if the socket cannot be opened or the thread cannot be started; a
    /// reflector that does not answer is reported by [`Connection::poll`].
    fn open(connector: &UdpConnector) -> Result<Self, String> {
        let local: SocketAddr = if connector.server_addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        let (outgoing, frames) = crossbeam_channel::unbounded();
        let (inbound, incoming) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared::new());
        let worker = Worker::new(connector, socket, frames, inbound, shared.clone())?;
        let thread = std::thread::Builder::new()
            .name("synq-udp".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the network thread: {e}"))?;
        Ok(Self { outgoing: Some(outgoing), incoming, shared, closed: None, thread: Some(thread) })
    }

    /// Whether the netcode handshake completed and the connection is still open (messages sent
    /// before that wait in renet). Reflects the network thread's last iteration, at most about a
    /// millisecond old.
    pub fn is_connected(&self) -> bool {
        self.closed.is_none() && self.shared.state() == State::Connected
    }

    /// The round-trip time renet measures (smoothed over the acknowledged packets; it includes
    /// the reflector's delay before acknowledging), or `None` before the first measurement.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.rtt()
    }
}

impl Connection for UdpConnection {
    /// Encodes `message` and queues it for the network thread, which sends it within about a
    /// millisecond. `false` if the connection is closed, or if the frame does not fit what renet
    /// may hold unacknowledged ([`CHANNEL_MEMORY_BYTES`]); that message is then dropped, with a
    /// warning.
    fn send(&mut self, message: ClientMessage) -> bool {
        if self.closed.is_some() || self.shared.state() == State::Closed {
            return false;
        }
        let Some(outgoing) = &self.outgoing else { return false };
        let frame = codec::encode_client(&message);
        let len = frame.len();
        if len > CHANNEL_MEMORY_BYTES || !self.shared.reserve(len) {
            tracing::warn!("bevy_synq: a message of {len} bytes does not fit the UDP transport's send buffer; dropped");
            return false;
        }
        if outgoing.send(frame).is_err() {
            // The thread is gone; `poll` reports why.
            self.shared.release(len);
            return false;
        }
        true
    }

    /// The next message the network thread received, in order; once they are all handed out and
    /// the connection is closed, `Err` with the reason (`"no answer from the reflector"`,
    /// `"disconnected: …"`, `"undecodable message from the reflector: …"`, …), every time.
    fn poll(&mut self) -> Result<Option<Arc<ServerMessage>>, String> {
        if let Some(reason) = &self.closed {
            return Err(reason.clone());
        }
        let reason = match self.incoming.try_recv() {
            Ok(Inbound::Message(message)) => return Ok(Some(message)),
            Err(TryRecvError::Empty) => return Ok(None),
            Ok(Inbound::Closed(reason)) => reason,
            Err(TryRecvError::Disconnected) => "the network thread stopped".to_string(),
        };
        self.closed = Some(reason.clone());
        Err(reason)
    }

    fn rtt(&self) -> Option<Duration> {
        UdpConnection::rtt(self)
    }
}

impl Drop for UdpConnection {
    /// Tells the network thread to finish: it sends the frames queued so far, waits up to 100 ms
    /// for the reflector to acknowledge them (usually one round trip plus the reflector's ack
    /// delay, a few tens of milliseconds), sends netcode's disconnect packet and ends. Waits for
    /// that, but never longer than 250 ms: a thread that takes longer finishes on its own.
    fn drop(&mut self) {
        // The closed channel is the thread's signal to finish.
        self.outgoing = None;
        let Some(thread) = self.thread.take() else { return };
        let deadline = Instant::now() + DROP_WAIT;
        loop {
            // The thread drops its end of `incoming` when it ends.
            match self.incoming.recv_deadline(deadline) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = thread.join();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!("bevy_synq: the UDP network thread is slow to close; leaving it to finish");
                    return;
                }
            }
        }
    }
}
