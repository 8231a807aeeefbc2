//! The netcode side of the UDP reflector: renet_netcode's server transport, reshaped so that
//! packets can be flushed per connection.
//!
//! renet writes a packet to every connection that has pending acks whenever it is flushed; with
//! many connections, flushing everyone for every broadcast floods the socket with ack-only
//! datagrams. This transport flushes the connections that have frames queued as soon as the
//! frame-flush interval allows, and everyone (acks, resends) only every few milliseconds.
//!
//! Every datagram passes [`check_server_bound`] before renetcode sees it: renetcode 2.0.0 panics
//! on some malformed datagrams (see [`synq_protocol::netcode_guard`]). What the guard drops, and
//! what renetcode refuses, is counted and logged at most once per cause every few seconds, never
//! once per datagram.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use renet::RenetServer;
use renetcode::{NETCODE_MAX_PACKET_BYTES, NetcodeServer, ServerConfig, ServerResult};
use synq_protocol::netcode_guard::{Rejected, check_server_bound};

use super::log_limit::{LogLimit, netcode_errors};

/// Most datagrams taken in per loop iteration (≈ 180 KB): what is left waits for the next one.
const MAX_DATAGRAMS_PER_UPDATE: usize = 128;

pub(crate) struct Transport {
    socket: UdpSocket,
    netcode: NetcodeServer,
    buffer: Box<[u8; NETCODE_MAX_PACKET_BYTES]>,
    /// Counted, rate-limited reports of dropped datagrams (shared with the driver's own causes).
    pub log: LogLimit,
}

/// What the rate-limited log says for each cause a datagram is dropped for.
fn rejected_what(rejected: Rejected) -> &'static str {
    match rejected {
        Rejected::TooShort => "malformed datagrams dropped (too short)",
        Rejected::TooLong => "malformed datagrams dropped (too long)",
        Rejected::BadPrefix => "malformed datagrams dropped (bad prefix)",
        Rejected::WrongDirection(_) => "malformed datagrams dropped (packet type a server never receives)",
        Rejected::WrongSize(_) => "malformed datagrams dropped (wrong size for the packet type)",
    }
}

impl Transport {
    pub fn new(config: ServerConfig, socket: UdpSocket, log: LogLimit) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self { socket, netcode: NetcodeServer::new(config), buffer: Box::new([0; NETCODE_MAX_PACKET_BYTES]), log })
    }

    pub fn client_addr(&self, client: u64) -> Option<SocketAddr> {
        self.netcode.client_addr(client)
    }

    /// Advances netcode by `duration` and takes in every datagram waiting on the socket. With
    /// `maintain`, also runs netcode's per-connection upkeep (keep-alives, timeouts): it costs a
    /// pass over every connection, so the caller does it every few milliseconds, not on every
    /// datagram.
    ///
    /// Datagrams the guard refuses are dropped and counted; so are those renetcode refuses
    /// (undecryptable, replayed, bad connection requests), as far as
    /// [`super::netcode_error_counter`] is installed to count them.
    pub fn update(
        &mut self,
        now: Instant,
        duration: Duration,
        server: &mut RenetServer,
        maintain: bool,
    ) -> io::Result<()> {
        self.netcode.update(duration);
        // A burst (one client uploading megabytes) is taken in over several iterations, so that
        // ticks, acks and everyone else's messages keep flowing in between.
        for _ in 0..MAX_DATAGRAMS_PER_UPDATE {
            match self.socket.recv_from(&mut self.buffer[..]) {
                Ok((len, addr)) => {
                    let datagram = &mut self.buffer[..len];
                    if let Err(rejected) = check_server_bound(datagram) {
                        self.log.record(rejected_what(rejected), addr.ip(), now);
                        continue;
                    }
                    let errors = netcode_errors();
                    let result = self.netcode.process_packet(addr, datagram);
                    if netcode_errors() != errors {
                        self.log.record(
                            "packets refused by netcode (undecryptable, replayed or bad requests)",
                            addr.ip(),
                            now,
                        );
                    }
                    handle(result, &self.socket, server);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(e) => return Err(e),
            }
        }
        self.log.poll(now);
        if maintain {
            for client in self.netcode.clients_id() {
                let result = self.netcode.update_client(client);
                handle(result, &self.socket, server);
            }
        }
        for client in server.disconnections_id() {
            let result = self.netcode.disconnect(client);
            handle(result, &self.socket, server);
        }
        Ok(())
    }

    /// Sends what renet has for these connections.
    pub fn flush(&mut self, server: &mut RenetServer, clients: impl IntoIterator<Item = u64>) {
        for client in clients {
            let Ok(packets) = server.get_packets_to_send(client) else { continue };
            for packet in packets {
                match self.netcode.generate_payload_packet(client, &packet) {
                    Ok((addr, payload)) => {
                        if let Err(error) = self.socket.send_to(payload, addr) {
                            tracing::debug!(client, %addr, %error, "cannot send a packet");
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(client, %error, "cannot seal a packet");
                        break;
                    }
                }
            }
        }
    }

    /// Sends what renet has for every connection (acks, resends, keep-alives).
    pub fn flush_all(&mut self, server: &mut RenetServer) {
        let clients = server.clients_id();
        self.flush(server, clients);
    }

    /// Disconnects everyone at once (netcode's disconnect packets).
    pub fn disconnect_all(&mut self, server: &mut RenetServer) {
        for client in self.netcode.clients_id() {
            let result = self.netcode.disconnect(client);
            handle(result, &self.socket, server);
        }
    }
}

fn handle(result: ServerResult, socket: &UdpSocket, server: &mut RenetServer) {
    let send = |packet: &[u8], addr: SocketAddr| {
        if let Err(error) = socket.send_to(packet, addr) {
            tracing::debug!(%addr, %error, "cannot send a netcode packet");
        }
    };
    match result {
        ServerResult::None => {}
        ServerResult::PacketToSend { payload, addr } => send(payload, addr),
        ServerResult::Payload { client_id, payload } => {
            if let Err(error) = server.process_packet_from(payload, client_id) {
                tracing::debug!(client = client_id, %error, "cannot process a payload");
            }
        }
        ServerResult::ClientConnected { client_id, addr, payload, .. } => {
            server.add_connection(client_id);
            send(payload, addr);
        }
        ServerResult::ClientDisconnected { client_id, addr, payload } => {
            server.remove_connection(client_id);
            if let Some(payload) = payload {
                send(payload, addr);
            }
        }
    }
}
