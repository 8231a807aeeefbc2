//! The network transport: a reflector reached over UDP (renet + netcode), as served by
//! `synq-reflector` or [`synq_reflector::server::UdpReflector`].
//!
//! ```no_run
//! use bevy_synq::prelude::*;
//! use bevy_synq::transport::udp::UdpConnector;
//! use bevy_synq::protocol::udp::DEFAULT_PROTOCOL_ID;
//! use std::sync::{Arc, Mutex};
//!
//! let connector = UdpConnector::new("127.0.0.1:5800".parse().unwrap(), DEFAULT_PROTOCOL_ID);
//! let target = ReflectorTarget::Custom(Arc::new(Mutex::new(Some(Box::new(connector)))));
//! ```
//!
//! [`Connection::poll`] drives the socket itself (receives, advances renet's clock, sends), so the
//! plugin needs no extra system; [`Connection::send`] flushes at once, so an event leaves in the
//! frame it was published. Transport-level security is netcode's *unsecure* mode: the payloads
//! that matter are sealed end to end before they get here.
//!
//! The socket is read here rather than by `renet_netcode`'s client transport, so that every
//! datagram can be checked first: only datagrams from the reflector's address that pass
//! [`synq_protocol::netcode_guard::check_client_bound`] reach renetcode, whose parser panics on
//! some malformed datagrams (anyone can spoof the reflector's address).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use renet::RenetClient;
use renetcode::{ClientAuthentication, NetcodeClient};
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::netcode_guard::{MAX_DATAGRAM_BYTES, check_client_bound};
use synq_protocol::wire::{ClientMessage, ServerMessage};
use synq_protocol::udp::{CHANNEL, CHANNEL_MEMORY_BYTES, connection_config};

use super::{Connection, Connector};

/// Opens [`UdpConnection`]s to a reflector at a UDP address.
#[derive(Clone, Debug)]
pub struct UdpConnector {
    server_addr: SocketAddr,
    protocol_id: u64,
    limits: Limits,
    connect_timeout: Duration,
}

impl UdpConnector {
    /// Connects to the reflector at `server_addr`, which must use the same netcode `protocol_id`
    /// (usually [`synq_protocol::udp::DEFAULT_PROTOCOL_ID`]).
    pub fn new(server_addr: SocketAddr, protocol_id: u64) -> Self {
        Self { server_addr, protocol_id, limits: Limits::default(), connect_timeout: Duration::from_secs(5) }
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
    fn connect(&mut self) -> Result<Box<dyn Connection>, String> {
        Ok(Box::new(UdpConnection::open(self)?))
    }

    fn describe(&self) -> String {
        format!("the reflector at udp://{}", self.server_addr)
    }
}

/// One connection to a UDP reflector. Dropping it tells the reflector at once.
pub struct UdpConnection {
    client: RenetClient,
    transport: Transport,
    limits: Limits,
    /// When renet's clock was last advanced.
    last_update: Instant,
    /// Give up if not connected by then.
    connect_deadline: Option<Instant>,
    inbox: VecDeque<Arc<ServerMessage>>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

fn random_client_id() -> u64 {
    use chacha20poly1305::aead::rand_core::RngCore;
    chacha20poly1305::aead::OsRng.next_u64()
}

impl UdpConnection {
    fn open(connector: &UdpConnector) -> Result<Self, String> {
        let local: SocketAddr = if connector.server_addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let authentication = ClientAuthentication::Unsecure {
            protocol_id: connector.protocol_id,
            client_id: random_client_id(),
            server_addr: connector.server_addr,
            user_data: None,
        };
        let transport = Transport::new(now, authentication, socket)?;
        let started = Instant::now();
        let mut connection = Self {
            client: RenetClient::new(connection_config()),
            transport,
            limits: connector.limits,
            last_update: started,
            connect_deadline: Some(started + connector.connect_timeout),
            inbox: VecDeque::new(),
            closed: None,
        };
        // Sends the first connection request now rather than at the first poll.
        connection.pump();
        Ok(connection)
    }

    /// Whether the netcode handshake completed (messages sent before that wait in renet).
    pub fn is_connected(&self) -> bool {
        self.closed.is_none() && self.client.is_connected()
    }

    /// The round-trip time renet measures, in seconds.
    pub fn rtt(&self) -> f64 {
        self.client.rtt()
    }

    fn fail(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(reason);
        }
    }

    /// Advances renet, receives and decodes what arrived, and sends what is queued.
    fn pump(&mut self) {
        if self.closed.is_some() {
            return;
        }
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last_update);
        self.last_update = now;
        self.client.update(dt);
        let updated = self.transport.update(dt, &mut self.client);
        // Deliver what arrived before any failure, so a final error from the reflector is seen.
        while let Some(frame) = self.client.receive_message(CHANNEL) {
            match codec::decode_server(&frame, &self.limits) {
                Ok(message) => self.inbox.push_back(Arc::new(message)),
                Err(e) => {
                    self.fail(format!("undecodable message from the reflector: {e}"));
                    self.transport.disconnect();
                    return;
                }
            }
        }
        if let Err(e) = updated {
            return self.fail(format!("disconnected: {e}"));
        }
        if self.client.is_connected() {
            self.connect_deadline = None;
            self.flush();
        } else if self.connect_deadline.is_some_and(|deadline| now >= deadline) {
            self.fail("no answer from the reflector".into());
            self.transport.disconnect();
        }
    }

    fn flush(&mut self) {
        if self.closed.is_none()
            && self.client.is_connected()
            && let Err(e) = self.transport.send_packets(&mut self.client)
        {
            self.fail(format!("cannot send: {e}"));
        }
    }
}

/// netcode over a UDP socket (what `renet_netcode::NetcodeClientTransport` does), with every
/// received datagram checked before renetcode parses it.
struct Transport {
    socket: UdpSocket,
    netcode: NetcodeClient,
    buffer: Box<[u8; MAX_DATAGRAM_BYTES]>,
}

impl Transport {
    fn new(now: Duration, authentication: ClientAuthentication, socket: UdpSocket) -> Result<Self, String> {
        socket.set_nonblocking(true).map_err(|e| format!("cannot configure the UDP socket: {e}"))?;
        let netcode = NetcodeClient::new(now, authentication).map_err(|e| e.to_string())?;
        Ok(Self { socket, netcode, buffer: Box::new([0; MAX_DATAGRAM_BYTES]) })
    }

    /// Takes in what arrived from the reflector, advances netcode by `duration` and sends its
    /// handshake or keep-alive packet if one is due.
    fn update(&mut self, duration: Duration, client: &mut RenetClient) -> Result<(), String> {
        if let Some(reason) = self.netcode.disconnect_reason() {
            client.disconnect_due_to_transport();
            return Err(reason.to_string());
        }
        if let Some(reason) = client.disconnect_reason() {
            self.disconnect();
            return Err(reason.to_string());
        }
        if self.netcode.is_connected() {
            client.set_connected();
        } else if self.netcode.is_connecting() {
            client.set_connecting();
        }
        let server = self.netcode.server_addr();
        loop {
            match self.socket.recv_from(&mut self.buffer[..]) {
                Ok((len, addr)) => {
                    let datagram = &mut self.buffer[..len];
                    // Anyone may send to this port, and spoof the reflector's address too.
                    if addr != server || check_client_bound(datagram).is_err() {
                        continue;
                    }
                    if let Some(payload) = self.netcode.process_packet(datagram) {
                        client.process_packet(payload);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
                // An ICMP "port unreachable" for an earlier send (Windows reports it here).
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(e) => return Err(format!("cannot receive: {e}")),
            }
        }
        if let Some((packet, addr)) = self.netcode.update(duration) {
            self.socket.send_to(packet, addr).map_err(|e| format!("cannot send: {e}"))?;
        }
        Ok(())
    }

    /// Sends what renet has queued.
    fn send_packets(&mut self, client: &mut RenetClient) -> Result<(), String> {
        if let Some(reason) = self.netcode.disconnect_reason() {
            return Err(reason.to_string());
        }
        for packet in client.get_packets_to_send() {
            let (addr, payload) = self.netcode.generate_payload_packet(&packet).map_err(|e| e.to_string())?;
            self.socket.send_to(payload, addr).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Tells the reflector (once) that this end is gone.
    fn disconnect(&mut self) {
        if self.netcode.is_disconnected() {
            return;
        }
        if let Ok((addr, packet)) = self.netcode.disconnect() {
            // Best effort: the reflector times the connection out anyway.
            let _ = self.socket.send_to(packet, addr);
        }
    }
}

impl Connection for UdpConnection {
    fn send(&mut self, message: ClientMessage) -> bool {
        if self.closed.is_some() {
            return false;
        }
        let frame = codec::encode_client(&message);
        if frame.len() > CHANNEL_MEMORY_BYTES || !self.client.can_send_message(CHANNEL, frame.len()) {
            ::tracing::warn!(
                "bevy_synq: a message of {} bytes does not fit the UDP transport's send buffer; dropped",
                frame.len()
            );
            return false;
        }
        self.client.send_message(CHANNEL, frame);
        self.flush();
        true
    }

    fn poll(&mut self) -> Result<Option<Arc<ServerMessage>>, String> {
        if self.inbox.is_empty() {
            self.pump();
        }
        match self.inbox.pop_front() {
            Some(message) => Ok(Some(message)),
            None => match &self.closed {
                Some(reason) => Err(reason.clone()),
                None => Ok(None),
            },
        }
    }
}

impl Drop for UdpConnection {
    fn drop(&mut self) {
        if self.closed.is_none() {
            self.flush();
        }
        self.transport.disconnect();
    }
}
