//! netcode over a client's UDP socket: what `renet_netcode::NetcodeClientTransport` does, plus
//! what bevy_synq's wire needs of a client (every datagram checked before renetcode parses it,
//! [tick datagrams](super#ticks) taken out before renet sees them, and acknowledgements sent
//! only when something needs acknowledging).

use std::io;
use std::net::UdpSocket;
use std::time::Duration;

use renet::RenetClient;
use renetcode::{ClientAuthentication, NetcodeClient};

use super::{CHANNEL, CHANNEL_MEMORY_BYTES, RENET_ACK_PACKET, tick_frame};
use crate::netcode_guard::{MAX_DATAGRAM_BYTES, check_client_bound};

/// Datagrams taken per [`ClientSocket::update`] at most, so that a flood cannot starve the
/// sending side.
const MAX_DATAGRAMS_PER_UPDATE: usize = 1024;

/// A client's end of a UDP connection to the reflector: the socket and netcode. The caller owns
/// the renet end ([`RenetClient`]) and passes it in.
///
/// ```no_run
/// use std::net::UdpSocket;
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use renet::RenetClient;
/// use renetcode::ClientAuthentication;
/// use synq_protocol::udp::{ClientSocket, DEFAULT_PROTOCOL_ID, connection_config};
///
/// let authentication = ClientAuthentication::Unsecure {
///     protocol_id: DEFAULT_PROTOCOL_ID,
///     client_id: 7,
///     server_addr: "127.0.0.1:5800".parse().unwrap(),
///     user_data: None,
/// };
/// let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
/// let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
/// let mut connection = ClientSocket::new(now, authentication, socket).unwrap();
/// let mut renet = RenetClient::new(connection_config());
/// // On every wake-up: take in what arrived (ticks come out of the callback), then flush when due.
/// connection.update(Duration::from_millis(1), &mut renet, |tick_frame| println!("{} bytes", tick_frame.len())).unwrap();
/// if connection.owes_flush(&renet) {
///     connection.send_packets(&mut renet).unwrap();
/// }
/// ```
pub struct ClientSocket {
    socket: UdpSocket,
    netcode: NetcodeClient,
    buffer: Box<[u8; MAX_DATAGRAM_BYTES]>,
    /// The reflector sent a renet packet other than acks since the last flush.
    owes_ack: bool,
}

impl ClientSocket {
    /// netcode on `socket` (made non-blocking), with `authentication` naming the reflector. The
    /// caller enlarges the socket's buffers ([`super::enlarge_socket_buffers`]) and reports what
    /// the system refused.
    pub fn new(now: Duration, authentication: ClientAuthentication, socket: UdpSocket) -> Result<Self, String> {
        socket.set_nonblocking(true).map_err(|e| format!("cannot configure the UDP socket: {e}"))?;
        let netcode = NetcodeClient::new(now, authentication).map_err(|e| e.to_string())?;
        Ok(Self { socket, netcode, buffer: Box::new([0; MAX_DATAGRAM_BYTES]), owes_ack: false })
    }

    /// The socket, to wait on.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Takes in what arrived from the reflector: renet packets go to `client`, the codec frame of
    /// each tick datagram to `on_tick`. Then advances netcode by `duration` and sends its
    /// handshake or keep-alive packet if one is due. Datagrams from any other address, or that
    /// [`check_client_bound`] refuses, are dropped.
    pub fn update(
        &mut self,
        duration: Duration,
        client: &mut RenetClient,
        mut on_tick: impl FnMut(&[u8]),
    ) -> Result<(), String> {
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
        for _ in 0..MAX_DATAGRAMS_PER_UPDATE {
            match self.socket.recv_from(&mut self.buffer[..]) {
                Ok((len, addr)) => {
                    let datagram = &mut self.buffer[..len];
                    // Anyone may send to this port, and spoof the reflector's address too.
                    if addr != server || check_client_bound(datagram).is_err() {
                        continue;
                    }
                    let Some(payload) = self.netcode.process_packet(datagram) else { continue };
                    if let Some(frame) = tick_frame(payload) {
                        on_tick(frame);
                        continue;
                    }
                    self.owes_ack |= payload.first() != Some(&RENET_ACK_PACKET);
                    client.process_packet(payload);
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

    /// Whether a flush with nothing new queued is worth a datagram: the reflector sent something
    /// to acknowledge, or what this end sent is not all acknowledged (renet resends it). renet
    /// adds an ack packet to every flush while it has acks to give, and the reflector does not
    /// answer acks with acks: flushing on a timer regardless would send the same acks forever.
    pub fn owes_flush(&self, client: &RenetClient) -> bool {
        self.owes_ack || client.channel_available_memory(CHANNEL) < CHANNEL_MEMORY_BYTES
    }

    /// Sends what renet has queued; returns the payload bytes sent.
    pub fn send_packets(&mut self, client: &mut RenetClient) -> Result<u64, String> {
        if let Some(reason) = self.netcode.disconnect_reason() {
            return Err(reason.to_string());
        }
        self.owes_ack = false;
        let mut sent = 0;
        for packet in client.get_packets_to_send() {
            let (addr, payload) = self.netcode.generate_payload_packet(&packet).map_err(|e| e.to_string())?;
            self.socket.send_to(payload, addr).map_err(|e| e.to_string())?;
            sent += packet.len() as u64;
        }
        Ok(sent)
    }

    /// Tells the reflector (once) that this end is gone.
    pub fn disconnect(&mut self) {
        if self.netcode.is_disconnected() {
            return;
        }
        if let Ok((addr, packet)) = self.netcode.disconnect() {
            // Best effort: the reflector times the connection out anyway.
            let _ = self.socket.send_to(packet, addr);
        }
    }
}
