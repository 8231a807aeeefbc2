//! The connection layer of the UDP reflector: netcode (renetcode's server, driven directly) and one
//! renet endpoint per connection, with per-connection timers instead of sweeps.
//!
//! # Shards
//!
//! renetcode's server holds at most 1,024 clients and finds a connection by a linear scan of its
//! slots on every datagram. The transport runs several netcode servers ("shards", created as they
//! are needed) on the one socket and routes each datagram by its source address: a connected or
//! handshaking address goes to the shard that knows it, a connection request from a new address
//! goes to a shard with a free slot, and anything else from an unknown address is dropped (no
//! shard could decrypt it). With `max_clients` up to [`SHARD_SLOTS`] there is a single shard of
//! exactly `max_clients` slots, as before. An address stays routed to its shard for 10 s of
//! handshake at most, and at most 4 × `max_clients` (at least 4,096, netcode's own bound on one
//! server's handshakes) addresses may be in a handshake at once: requests beyond are dropped and
//! counted, so spoofed source addresses cannot grow the routing table without bound. Every datagram still passes [`check_server_bound`]
//! first (renetcode 2.0.0 panics on some malformed datagrams; see
//! [`synq_protocol::netcode_guard`]).
//!
//! # Idle connections cost nothing per iteration
//!
//! Nothing here walks every connection on a loop iteration. Each connection's renet endpoint is
//! advanced only when it is used; a timer heap wakes a connection when it owes an ack, when it may
//! have something to resend, or when netcode may owe it a keep-alive (nothing sent for 250 ms) or
//! must check it for a timeout (nothing received for a second).
//!
//! renet acknowledges every packet it receives, including packets that carry nothing but acks, and
//! appends an ack packet to everything it sends while it has any to give; so two renet ends that
//! flush on a timer acknowledge each other's acknowledgements forever. The reflector asks renet
//! for packets only when it has messages to send, when the client sent something other than acks
//! (messages, slices) since the last time, or when a resend may be due: a client's acks alone get
//! no answer, unless the last flush left more queued than renet sends at once (a large `Sync`):
//! then each ack releases the next part, so the transfer goes at the pace the client takes it in. Heartbeat ticks bypass renet ([`Transport::send_datagram`], see
//! [`synq_protocol::udp#ticks`]), and clients acknowledge nothing else of an idle session, so an
//! idle client costs its ticks out and netcode's keep-alives in (one every 250 ms), nothing more.
//! (Ack packets are never dropped once renet made them: a gap in the sequence numbers would split
//! the peer's ack ranges.)
//!
//! # Batched system calls
//!
//! On Linux datagrams are read with `recvmmsg` and written with `sendmmsg`, up to
//! [`BATCH`] per call; what an iteration sends is queued and written once at its end
//! ([`Transport::send_queued`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use renet::{Bytes, DisconnectReason, RenetClient};
use renetcode::{NETCODE_MAX_PACKET_BYTES, NetcodeServer, ServerConfig, ServerResult};
use synq_protocol::netcode_guard::{PacketKind, Rejected, check_server_bound};
use synq_protocol::udp::{BYTES_PER_FLUSH, CHANNEL, CHANNEL_MEMORY_BYTES, RENET_ACK_PACKET, connection_config};

use super::log_limit::{LogLimit, netcode_errors};

/// Most datagrams taken in per loop iteration (≈ 1.4 MB): what is left waits for the next one.
/// Large enough that a loop that sleeps between iterations (many idle clients, see
/// `server.rs`) or was descheduled for a few milliseconds still drains the socket faster than
/// tens of thousands of clients fill it.
const MAX_DATAGRAMS_PER_UPDATE: usize = 1024;

/// Datagrams per `recvmmsg` / `sendmmsg` call.
pub(crate) const BATCH: usize = 32;

/// Slots of one netcode server (shard) when `max_clients` needs more than one.
pub(crate) const SHARD_SLOTS: usize = 256;

/// How long after a client's message (not an ack) the reflector's ack goes out at the latest
/// (sooner when frames are flushed to it anyway). renet resends after 100 ms.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// While sent messages are unacknowledged, renet is asked for resends this long after the last
/// flush (its resend time, see [`synq_protocol::udp::connection_config`]).
const RESEND_CHECK: Duration = Duration::from_millis(100);

/// netcode sends a keep-alive to a connection it sent nothing to for this long (its send rate).
const KEEP_ALIVE: Duration = Duration::from_millis(250);

/// netcode's timeout check runs at least this often on a silent connection.
const TIMEOUT_CHECK: Duration = Duration::from_secs(1);

/// How long an address that sent a connection request stays routed to its shard without
/// completing the handshake.
const HANDSHAKE_ROUTE: Duration = Duration::from_secs(10);

/// What the transport reports to the driver.
#[derive(Debug)]
pub(crate) enum Event {
    /// A connection completed netcode's handshake.
    Connected { id: u64, addr: SocketAddr },
    /// A connection ended (timed out, disconnected by the client, the server or renet).
    Disconnected { id: u64, reason: DisconnectReason },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Connected: the transport's connection id.
    Connected(u64),
    /// In netcode's handshake with this shard (since when).
    Handshake(usize),
}

struct Shard {
    netcode: NetcodeServer,
    slots: usize,
    /// Connected clients plus addresses in the handshake routed here.
    used: usize,
}

struct Connection {
    shard: usize,
    /// netcode's id for it (unique within its shard only).
    netcode_id: u64,
    addr: SocketAddr,
    renet: RenetClient,
    /// The time renet was last advanced to.
    renet_at: Instant,
    last_sent: Instant,
    last_received: Instant,
    /// When renet was last asked for packets.
    last_flush: Instant,
    /// Since when the client has sent something other than acks that renet was not asked to
    /// acknowledge yet.
    owes_ack: Option<Instant>,
    /// The last flush used most of renet's per-flush allowance ([`BYTES_PER_FLUSH`]): more is
    /// queued (a large `Sync` going out), and the client's next acks call for the next part.
    more_queued: bool,
    /// The client acknowledged something since the last flush while more was queued: flush at
    /// once (sending is clocked by the client's acks, so it goes as fast as the client takes in).
    continue_now: bool,
    /// The earliest time a heap entry wakes this connection for.
    scheduled: Option<Instant>,
}

impl Connection {
    fn advance(&mut self, now: Instant) {
        if now > self.renet_at {
            self.renet.update(now - self.renet_at);
            self.renet_at = now;
        }
    }

    fn unacked(&self) -> bool {
        self.renet.is_connected() && self.renet.channel_available_memory(CHANNEL) < CHANNEL_MEMORY_BYTES
    }

    /// When this connection next needs attention.
    fn next_wake(&self, now: Instant) -> Instant {
        if self.continue_now {
            return now;
        }
        let mut wake = (self.last_sent + KEEP_ALIVE).min(self.last_received + TIMEOUT_CHECK);
        if let Some(at) = self.owes_ack {
            wake = wake.min(at + ACK_DELAY);
        }
        if self.unacked() {
            wake = wake.min((self.last_flush + RESEND_CHECK).max(now));
        }
        wake
    }

    /// Whether renet should be asked for packets now, with no new message queued.
    fn flush_due(&self, now: Instant) -> bool {
        self.continue_now
            || self.owes_ack.is_some_and(|t| now >= t + ACK_DELAY)
            || (now >= self.last_flush + RESEND_CHECK && self.unacked())
    }
}

/// Datagrams queued for one `sendmmsg`.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    datagrams: Vec<(SocketAddr, usize, usize)>,
}

impl Outbox {
    fn push(&mut self, addr: SocketAddr, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.datagrams.push((addr, start, datagram.len()));
    }
}

pub(crate) struct Transport {
    socket: UdpSocket,
    config: ServerConfig,
    max_clients: usize,
    /// Slots per shard when `max_clients` needs several ([`SHARD_SLOTS`]; smaller in tests).
    shard_slots: usize,
    shards: Vec<Shard>,
    routes: HashMap<SocketAddr, Route>,
    /// Handshake routes in the order they were made, to expire them.
    handshakes: VecDeque<(Instant, SocketAddr)>,
    /// Addresses routed as [`Route::Handshake`], and how many may be at once (anyone can send
    /// connection requests from as many source addresses as they like).
    handshaking: usize,
    handshake_limit: usize,
    connections: HashMap<u64, Connection>,
    next_id: u64,
    events: VecDeque<Event>,
    /// Connections that received messages since [`Transport::take_readable`].
    readable: Vec<u64>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    last_update: Instant,
    receive: Receiver,
    outbox: Outbox,
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

fn copy_config(config: &ServerConfig, max_clients: usize, current_time: Duration) -> ServerConfig {
    ServerConfig {
        current_time,
        max_clients,
        protocol_id: config.protocol_id,
        public_addresses: config.public_addresses.clone(),
        authentication: renetcode::ServerAuthentication::Unsecure,
    }
}

impl Transport {
    /// A transport for up to `config.max_clients` connections (netcode unsecure; the config's
    /// authentication is not used).
    pub fn new(config: ServerConfig, socket: UdpSocket, log: LogLimit) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let now = Instant::now();
        Ok(Self {
            receive: Receiver::new(&socket),
            socket,
            max_clients: config.max_clients,
            handshake_limit: (4 * config.max_clients).max(4096),
            shard_slots: SHARD_SLOTS,
            config,
            shards: Vec::new(),
            routes: HashMap::new(),
            handshakes: VecDeque::new(),
            handshaking: 0,
            connections: HashMap::new(),
            next_id: 1,
            events: VecDeque::new(),
            readable: Vec::new(),
            timers: BinaryHeap::new(),
            last_update: now,
            outbox: Outbox::default(),
            log,
        })
    }

    /// Number of open connections.
    pub fn connected(&self) -> usize {
        self.connections.len()
    }

    /// Number of netcode servers (shards) created so far.
    #[cfg(test)]
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The ids of every open connection.
    pub fn ids(&self) -> Vec<u64> {
        self.connections.keys().copied().collect()
    }

    /// Whether messages or connection events arrived since they were last taken (acks and
    /// keep-alives alone do not count).
    pub fn has_news(&self) -> bool {
        !self.readable.is_empty() || !self.events.is_empty()
    }

    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The connections that received messages since the last call.
    pub fn take_readable(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.readable)
    }

    pub fn is_connected(&self, id: u64) -> bool {
        self.connections.get(&id).is_some_and(|c| c.renet.is_connected())
    }

    /// Whether everything sent to `id` was acknowledged (or it is gone).
    pub fn acknowledged(&self, id: u64) -> bool {
        self.connections.get(&id).is_none_or(|c| !c.unacked())
    }

    /// The bytes `id` holds unacknowledged or queued (zero once it is gone).
    pub fn backlog(&self, id: u64) -> usize {
        self.connections
            .get(&id)
            .map_or(0, |c| CHANNEL_MEMORY_BYTES.saturating_sub(c.renet.channel_available_memory(CHANNEL)))
    }

    pub fn can_send(&self, id: u64, bytes: usize) -> bool {
        self.connections.get(&id).is_some_and(|c| c.renet.is_connected() && c.renet.can_send_message(CHANNEL, bytes))
    }

    /// Queues a message for `id` (sent at the next [`Transport::flush`] of it).
    pub fn send_message(&mut self, id: u64, message: Bytes) {
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.renet.send_message(CHANNEL, message);
        }
    }

    /// Sends `payload` to `id` at the next [`Transport::send_queued`] as a netcode datagram of
    /// its own, outside renet: no record, no resend (a tick datagram, see
    /// [`synq_protocol::udp#ticks`]).
    pub fn send_datagram(&mut self, now: Instant, id: u64, payload: &[u8]) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        if !connection.renet.is_connected() {
            return;
        }
        match self.shards[connection.shard].netcode.generate_payload_packet(connection.netcode_id, payload) {
            Ok((addr, datagram)) => {
                self.outbox.push(addr, datagram);
                connection.last_sent = now;
            }
            Err(error) => tracing::debug!(id, %error, "cannot seal a datagram"),
        }
    }

    pub fn receive_message(&mut self, id: u64) -> Option<Bytes> {
        self.connections.get_mut(&id)?.renet.receive_message(CHANNEL)
    }

    /// Advances netcode to `now` and takes in the datagrams waiting on the socket (at most
    /// [`MAX_DATAGRAMS_PER_UPDATE`]; a burst is taken in over several iterations, so that ticks,
    /// acks and everyone else's messages keep flowing in between). Datagrams the guard refuses
    /// are dropped and counted; so are those renetcode refuses (undecryptable, replayed, bad
    /// connection requests), as far as [`super::netcode_error_counter`] is installed to count them.
    pub fn update(&mut self, now: Instant) -> io::Result<()> {
        let dt = now.saturating_duration_since(self.last_update);
        self.last_update = self.last_update.max(now);
        for shard in &mut self.shards {
            shard.netcode.update(dt);
        }
        while let Some(&(since, addr)) = self.handshakes.front() {
            if now < since + HANDSHAKE_ROUTE {
                break;
            }
            self.handshakes.pop_front();
            if let Some(&Route::Handshake(shard)) = self.routes.get(&addr) {
                self.routes.remove(&addr);
                self.shards[shard].used -= 1;
                self.handshaking -= 1;
            }
        }
        let mut taken = 0;
        let mut result = Ok(());
        let mut datagram = [0u8; NETCODE_MAX_PACKET_BYTES];
        while taken < MAX_DATAGRAMS_PER_UPDATE {
            let count = match self.receive.receive(&self.socket, BATCH.min(MAX_DATAGRAMS_PER_UPDATE - taken)) {
                Ok(0) => break,
                Ok(count) => count,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            taken += count;
            for i in 0..count {
                let (addr, len) = self.receive.datagram(i);
                datagram[..len].copy_from_slice(&self.receive.buffers[i][..len]);
                self.datagram(now, addr, &mut datagram[..len]);
            }
            if count < BATCH {
                break;
            }
        }
        self.log.poll(now);
        result
    }

    /// Handles one datagram from `addr`.
    fn datagram(&mut self, now: Instant, addr: SocketAddr, datagram: &mut [u8]) {
        let kind = match check_server_bound(datagram) {
            Ok(kind) => kind,
            Err(rejected) => return self.log.record(rejected_what(rejected), addr.ip(), now),
        };
        let route = self.routes.get(&addr).copied();
        let shard = match route {
            Some(Route::Connected(id)) => match self.connections.get(&id) {
                Some(connection) => connection.shard,
                None => return,
            },
            Some(Route::Handshake(shard)) => shard,
            None if kind == PacketKind::ConnectionRequest => {
                if self.handshaking >= self.handshake_limit {
                    return self.log.record(
                        "connection requests dropped (too many handshakes under way)",
                        addr.ip(),
                        now,
                    );
                }
                self.shard_for_new()
            }
            None => {
                // No shard knows this address: nothing it sent could be decrypted.
                return self.log.record("datagrams from unknown addresses dropped", addr.ip(), now);
            }
        };
        let errors = netcode_errors();
        let result = self.shards[shard].netcode.process_packet(addr, datagram);
        if netcode_errors() != errors {
            self.log.record("packets refused by netcode (undecryptable, replayed or bad requests)", addr.ip(), now);
        }
        match result {
            ServerResult::None => {}
            ServerResult::PacketToSend { payload, addr } => {
                self.outbox.push(addr, payload);
                if route.is_none() {
                    // A challenge (or a refusal): the answer comes back to this shard.
                    self.routes.insert(addr, Route::Handshake(shard));
                    self.handshakes.push_back((now, addr));
                    self.handshaking += 1;
                    self.shards[shard].used += 1;
                }
            }
            ServerResult::Payload { payload, .. } => {
                let Some(Route::Connected(id)) = route else { return };
                let Some(connection) = self.connections.get_mut(&id) else { return };
                connection.advance(now);
                connection.last_received = now;
                if payload.first() != Some(&RENET_ACK_PACKET) && connection.owes_ack.is_none() {
                    connection.owes_ack = Some(now);
                }
                let acks_only = payload.first() == Some(&RENET_ACK_PACKET);
                connection.continue_now |= connection.more_queued;
                connection.renet.process_packet(payload);
                if connection.renet.is_disconnected() {
                    // renet refused the packet (a protocol error): netcode closes the connection.
                    self.disconnect(now, id);
                    return;
                }
                if !acks_only {
                    self.readable.push(id);
                }
                self.schedule(id, now);
            }
            ServerResult::ClientConnected { client_id, addr, payload, .. } => {
                self.outbox.push(addr, payload);
                let id = self.next_id;
                self.next_id += 1;
                match route {
                    None => self.shards[shard].used += 1,
                    Some(Route::Handshake(_)) => self.handshaking -= 1,
                    Some(Route::Connected(_)) => {}
                }
                self.routes.insert(addr, Route::Connected(id));
                let mut renet = RenetClient::new(connection_config());
                renet.set_connected();
                let connection = Connection {
                    shard,
                    netcode_id: client_id,
                    addr,
                    renet,
                    renet_at: now,
                    last_sent: now,
                    last_received: now,
                    last_flush: now,
                    owes_ack: None,
                    more_queued: false,
                    continue_now: false,
                    scheduled: None,
                };
                self.connections.insert(id, connection);
                self.events.push_back(Event::Connected { id, addr });
                self.schedule(id, now);
            }
            ServerResult::ClientDisconnected { addr, payload, .. } => {
                if let Some(payload) = payload {
                    self.outbox.push(addr, payload);
                }
                if let Some(Route::Connected(id)) = route {
                    self.forget(id, DisconnectReason::DisconnectedByClient);
                }
            }
        }
    }

    /// The shard a connection request from a new address goes to: the first with a free slot,
    /// a new one if all are full and `max_clients` allows, else the first (whose netcode refuses
    /// it when it is really full).
    fn shard_for_new(&mut self) -> usize {
        if let Some(index) = self.shards.iter().position(|s| s.used < s.slots) {
            return index;
        }
        let planned: usize = self.shards.iter().map(|s| s.slots).sum();
        if planned < self.max_clients || self.shards.is_empty() {
            let slots = (self.max_clients - planned).clamp(1, self.shard_slots);
            let current_time =
                self.shards.first().map(|s| s.netcode.current_time()).unwrap_or(self.config.current_time);
            let netcode = NetcodeServer::new(copy_config(&self.config, slots, current_time));
            self.shards.push(Shard { netcode, slots, used: 0 });
            return self.shards.len() - 1;
        }
        0
    }

    /// Removes a connection whose netcode side is gone, and reports it.
    fn forget(&mut self, id: u64, reason: DisconnectReason) {
        let Some(connection) = self.connections.remove(&id) else { return };
        if self.routes.get(&connection.addr) == Some(&Route::Connected(id)) {
            self.routes.remove(&connection.addr);
            self.shards[connection.shard].used -= 1;
        }
        let reason = connection.renet.disconnect_reason().unwrap_or(reason);
        self.events.push_back(Event::Disconnected { id, reason });
    }

    /// Disconnects `id` at once (netcode's disconnect packet) and reports it.
    pub fn disconnect(&mut self, _now: Instant, id: u64) {
        let Some(connection) = self.connections.get(&id) else { return };
        let shard = connection.shard;
        if let ServerResult::ClientDisconnected { addr, payload: Some(payload), .. } =
            self.shards[shard].netcode.disconnect(connection.netcode_id)
        {
            self.outbox.push(addr, payload);
        }
        self.forget(id, DisconnectReason::DisconnectedByServer);
    }

    /// Disconnects everyone at once.
    pub fn disconnect_all(&mut self, now: Instant) {
        for id in self.ids() {
            self.disconnect(now, id);
        }
        self.send_queued();
    }

    fn schedule(&mut self, id: u64, now: Instant) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        let wake = connection.next_wake(now);
        if connection.scheduled.is_none_or(|at| wake < at || at <= now) {
            connection.scheduled = Some(wake);
            self.timers.push(Reverse((wake, id)));
        }
    }

    /// Serves the connections whose timers are due: acks owed, resends, netcode's keep-alives
    /// and timeouts.
    pub fn run_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(connection) = self.connections.get_mut(&id) else { continue };
            if connection.scheduled != Some(at) {
                continue; // superseded by an earlier entry, which already ran
            }
            connection.scheduled = None;
            let flush = connection.flush_due(now);
            let upkeep = now >= connection.last_sent + KEEP_ALIVE || now >= connection.last_received + TIMEOUT_CHECK;
            if flush {
                self.flush_one(now, id);
            }
            if upkeep && self.upkeep(now, id) {
                continue;
            }
            self.schedule(id, now);
        }
    }

    /// netcode's upkeep of one connection: a keep-alive when nothing was sent for a while, the
    /// timeout check. Returns whether the connection ended.
    fn upkeep(&mut self, now: Instant, id: u64) -> bool {
        let Some(connection) = self.connections.get_mut(&id) else { return true };
        let netcode = &mut self.shards[connection.shard].netcode;
        match netcode.update_client(connection.netcode_id) {
            ServerResult::PacketToSend { payload, addr } => {
                connection.last_sent = now;
                self.outbox.push(addr, payload);
                false
            }
            ServerResult::ClientDisconnected { addr, payload, .. } => {
                if let Some(payload) = payload {
                    self.outbox.push(addr, payload);
                }
                self.forget(id, DisconnectReason::Transport);
                true
            }
            ServerResult::None => {
                // netcode sent nothing: it sent something less than its keep-alive time ago.
                if now >= connection.last_sent + KEEP_ALIVE {
                    connection.last_sent = now;
                }
                if now >= connection.last_received + TIMEOUT_CHECK {
                    // Not timed out: check again in half the interval.
                    connection.last_received = now.checked_sub(TIMEOUT_CHECK / 2).unwrap_or(now);
                }
                false
            }
            ServerResult::Payload { .. } | ServerResult::ClientConnected { .. } => false,
        }
    }

    /// Queues what renet has for these connections.
    pub fn flush(&mut self, now: Instant, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.flush_one(now, id);
        }
    }

    fn flush_one(&mut self, now: Instant, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        connection.advance(now);
        connection.last_flush = now;
        connection.owes_ack = None;
        connection.continue_now = false;
        let packets = connection.renet.get_packets_to_send();
        let bytes: usize = packets.iter().map(Vec::len).sum();
        connection.more_queued = bytes as u64 * 2 >= BYTES_PER_FLUSH;
        let netcode = &mut self.shards[connection.shard].netcode;
        for packet in packets {
            match netcode.generate_payload_packet(connection.netcode_id, &packet) {
                Ok((addr, payload)) => {
                    self.outbox.push(addr, payload);
                    connection.last_sent = now;
                }
                Err(error) => {
                    tracing::debug!(id, %error, "cannot seal a packet");
                    break;
                }
            }
        }
        if connection.renet.is_disconnected() {
            // renet gave up on it (a channel error): netcode closes the connection.
            self.disconnect(now, id);
            return;
        }
        self.schedule(id, now);
    }

    /// Queues what renet has for every connection (acks, resends).
    pub fn flush_all(&mut self, now: Instant) {
        let ids = self.ids();
        self.flush(now, ids);
    }

    /// Writes the queued datagrams to the socket.
    pub fn send_queued(&mut self) {
        let Outbox { bytes, datagrams } = &mut self.outbox;
        send_batches(&self.socket, bytes, datagrams);
        bytes.clear();
        datagrams.clear();
    }

    /// The connections from `ip`, for tests.
    #[cfg(test)]
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.connections.values().filter(|c| c.addr.ip() == ip).count()
    }
}

/// Reads datagrams into a set of buffers.
struct Receiver {
    buffers: Vec<[u8; NETCODE_MAX_PACKET_BYTES]>,
    #[cfg(target_os = "linux")]
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    #[cfg(not(target_os = "linux"))]
    from: Vec<SocketAddr>,
}

impl Receiver {
    fn new(_socket: &UdpSocket) -> Self {
        Self {
            buffers: vec![[0; NETCODE_MAX_PACKET_BYTES]; BATCH],
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            #[cfg(target_os = "linux")]
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: vec![0; BATCH],
            #[cfg(not(target_os = "linux"))]
            from: vec![SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
        }
    }

    /// The `i`-th datagram of the last [`Receiver::receive`]: its source and length.
    fn datagram(&self, i: usize) -> (SocketAddr, usize) {
        #[cfg(target_os = "linux")]
        let addr = from_sockaddr(&self.addrs[i]).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        #[cfg(not(target_os = "linux"))]
        let addr = self.from[i];
        (addr, self.lens[i])
    }

    /// Reads up to `max` datagrams without blocking; returns how many.
    #[cfg(target_os = "linux")]
    fn receive(&mut self, socket: &UdpSocket, max: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let max = max.min(BATCH);
        let mut iovecs: Vec<libc::iovec> = self.buffers[..max]
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: NETCODE_MAX_PACKET_BYTES })
            .collect();
        // SAFETY: mmsghdr is plain data; the pointers are filled in below.
        let mut headers: Vec<libc::mmsghdr> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = &mut iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
        }
        loop {
            // SAFETY: every header points to a live buffer, address and iovec of the sizes given;
            // they outlive the call. MSG_DONTWAIT: never blocks.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr(),
                    max as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                let n = n as usize;
                for (i, header) in headers[..n].iter().enumerate() {
                    self.lens[i] = (header.msg_len as usize).min(NETCODE_MAX_PACKET_BYTES);
                }
                return Ok(n);
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionReset => continue,
                _ => return Err(error),
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn receive(&mut self, socket: &UdpSocket, max: usize) -> io::Result<usize> {
        let mut count = 0;
        while count < max.min(BATCH) {
            match socket.recv_from(&mut self.buffers[count][..]) {
                Ok((len, addr)) => {
                    self.lens[count] = len;
                    self.from[count] = addr;
                    count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(count)
    }
}

#[cfg(target_os = "linux")]
fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and aligned for a sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: v6.ip().octets() };
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Writes `datagrams` (address, start and length in `bytes`), [`BATCH`] per system call on Linux.
/// A datagram the socket refuses is dropped (logged at debug level), like a lost one.
fn send_batches(socket: &UdpSocket, bytes: &[u8], datagrams: &[(SocketAddr, usize, usize)]) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        for chunk in datagrams.chunks(BATCH) {
            let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
                chunk.iter().map(|(addr, _, _)| to_sockaddr(*addr)).collect();
            let mut iovecs: Vec<libc::iovec> = chunk
                .iter()
                .map(|&(_, start, len)| libc::iovec { iov_base: bytes[start..].as_ptr() as *mut _, iov_len: len })
                .collect();
            // SAFETY: mmsghdr is plain data; the pointers are filled in below.
            let mut headers: Vec<libc::mmsghdr> = (0..chunk.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (i, header) in headers.iter_mut().enumerate() {
                header.msg_hdr.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
                header.msg_hdr.msg_namelen = addrs[i].1;
                header.msg_hdr.msg_iov = &mut iovecs[i];
                header.msg_hdr.msg_iovlen = 1;
            }
            let mut sent = 0;
            while sent < headers.len() {
                // SAFETY: every header points to a live address and iovec (over `bytes`, which the
                // kernel only reads) that outlive the call.
                let n = unsafe {
                    libc::sendmmsg(
                        socket.as_raw_fd(),
                        headers[sent..].as_mut_ptr(),
                        (headers.len() - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    sent += n as usize;
                    continue;
                }
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first datagram failed (a full buffer, an unreachable address): skip it.
                tracing::debug!(addr = %chunk[sent].0, %error, "cannot send a packet");
                sent += 1;
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    for &(addr, start, len) in datagrams {
        if let Err(error) = socket.send_to(&bytes[start..start + len], addr) {
            tracing::debug!(%addr, %error, "cannot send a packet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use renetcode::{ClientAuthentication, NetcodeClient};

    const PROTOCOL_ID: u64 = 7;

    fn transport(max_clients: usize, shard_slots: usize) -> Transport {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let config = ServerConfig {
            current_time: Duration::ZERO,
            max_clients,
            protocol_id: PROTOCOL_ID,
            public_addresses: vec![addr],
            authentication: renetcode::ServerAuthentication::Unsecure,
        };
        let mut transport = Transport::new(config, socket, LogLimit::new(Duration::from_secs(10))).unwrap();
        transport.shard_slots = shard_slots;
        transport
    }

    /// A netcode client on a loopback socket of its own.
    struct Client {
        netcode: NetcodeClient,
        socket: UdpSocket,
    }

    impl Client {
        fn new(server: SocketAddr, client_id: u64) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            let auth = ClientAuthentication::Unsecure {
                protocol_id: PROTOCOL_ID,
                client_id,
                server_addr: server,
                user_data: None,
            };
            Self { netcode: NetcodeClient::new(Duration::ZERO, auth).unwrap(), socket }
        }

        /// Reads what arrived, then sends what netcode has to send after `dt`.
        fn pump(&mut self, dt: Duration) {
            let mut buffer = [0u8; NETCODE_MAX_PACKET_BYTES];
            while let Ok(len) = self.socket.recv(&mut buffer) {
                self.netcode.process_packet(&mut buffer[..len]);
            }
            if let Some((packet, addr)) = self.netcode.update(dt) {
                self.socket.send_to(packet, addr).unwrap();
            }
        }
    }

    /// Runs the clients and the transport until every client is connected or disconnected
    /// (at most 10 s of real time, so that a broken handshake fails instead of hanging).
    fn settle(transport: &mut Transport, clients: &mut [Client]) {
        let start = Instant::now();
        while clients.iter().any(|c| c.netcode.is_connecting()) && start.elapsed() < Duration::from_secs(10) {
            for client in clients.iter_mut() {
                client.pump(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(2));
            transport.update(Instant::now()).unwrap();
            transport.run_timers(Instant::now());
            transport.send_queued();
        }
        for client in clients.iter_mut() {
            client.pump(Duration::ZERO);
        }
    }

    #[test]
    fn connections_beyond_one_shard_open_new_shards_up_to_max_clients() {
        let mut transport = transport(5, 2);
        let server = transport.socket.local_addr().unwrap();
        let mut clients: Vec<Client> = (0..5).map(|i| Client::new(server, 100 + i)).collect();
        settle(&mut transport, &mut clients);
        assert!(clients.iter().all(|c| c.netcode.is_connected()));
        assert_eq!(transport.connected(), 5);
        assert_eq!(transport.shard_count(), 3, "shards of 2, 2 and 1 slots");
        let mut connected = 0;
        while let Some(event) = transport.next_event() {
            assert!(matches!(event, Event::Connected { .. }), "{event:?}");
            connected += 1;
        }
        assert_eq!(connected, 5);

        // Every shard is full: the next one is refused, and no shard is added.
        let mut late = [Client::new(server, 200)];
        settle(&mut transport, &mut late);
        assert!(late[0].netcode.is_disconnected(), "refused, not left waiting");
        assert_eq!(transport.connected(), 5);
        assert_eq!(transport.shard_count(), 3);

        // A slot freed in the middle shard is used again.
        let ids = transport.ids();
        transport.disconnect(Instant::now(), ids[2]);
        transport.send_queued();
        assert!(matches!(
            transport.next_event(),
            Some(Event::Disconnected { reason: DisconnectReason::DisconnectedByServer, .. })
        ));
        let mut again = [Client::new(server, 201)];
        settle(&mut transport, &mut again);
        assert!(again[0].netcode.is_connected());
        assert_eq!(transport.connected(), 5);
        assert_eq!(transport.shard_count(), 3);
    }

    #[test]
    fn a_large_message_goes_out_in_bursts_released_by_the_clients_acks() {
        use synq_protocol::udp::{ClientSocket, enlarge_socket_buffers};
        let mut transport = transport(4, 4);
        assert!(enlarge_socket_buffers(&transport.socket).is_empty());
        let server = transport.socket.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(enlarge_socket_buffers(&socket).is_empty());
        let auth = ClientAuthentication::Unsecure {
            protocol_id: PROTOCOL_ID,
            client_id: 1,
            server_addr: server,
            user_data: None,
        };
        let mut client = ClientSocket::new(Duration::ZERO, auth, socket).unwrap();
        let mut renet = RenetClient::new(connection_config());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !renet.is_connected() {
            assert!(Instant::now() < deadline, "the client could not connect");
            client.update(Duration::from_millis(5), &mut renet, |_| {}).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            transport.update(Instant::now()).unwrap();
            transport.run_timers(Instant::now());
            transport.send_queued();
        }
        let id = transport.ids()[0];

        // Three bursts' worth (renet sends BYTES_PER_FLUSH at once). Time below is the transport's
        // logical clock, stepped 1 ms at a time; loopback hands each datagram over within the send.
        let message = vec![7u8; 3 * BYTES_PER_FLUSH as usize - 1000];
        let start = Instant::now();
        transport.send_message(id, Bytes::from(message.clone()));
        transport.flush(start, [id]);
        transport.send_queued();
        let mut received = None;
        for ms in 1..RESEND_CHECK.as_millis() as u64 {
            let now = start + Duration::from_millis(ms);
            client.update(Duration::from_millis(1), &mut renet, |_| {}).unwrap();
            renet.update(Duration::from_millis(1));
            // Acknowledged every 10 ms, as bevy_synq's client does.
            if ms % 10 == 0 && client.owes_flush(&renet) {
                client.send_packets(&mut renet).unwrap();
            }
            transport.update(now).unwrap();
            transport.run_timers(now);
            transport.send_queued();
            if let Some(message) = renet.receive_message(CHANNEL) {
                received = Some((ms, message.len()));
                break;
            }
        }
        // Without the continuation, the second burst waited for the resend check (100 ms).
        let (at, len) = received.expect("the whole message arrived before renet's resend check");
        assert_eq!(len, message.len());
        assert!(at >= 20, "three bursts need two rounds of acks, yet it arrived at {at} ms");
    }

    #[test]
    fn datagrams_from_unknown_addresses_reach_no_shard() {
        let mut transport = transport(4, 2);
        let server = transport.socket.local_addr().unwrap();
        // A well-formed keep-alive (it passes the guard) from an address nobody connected from.
        let mut keep_alive = vec![0x14]; // type 4, one sequence byte
        keep_alive.push(1);
        keep_alive.extend_from_slice(&[0; 8 + 16]);
        assert_eq!(check_server_bound(&keep_alive), Ok(PacketKind::KeepAlive));
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(&keep_alive, server).unwrap();
        let start = Instant::now();
        while transport.routes.is_empty() && transport.shards.is_empty() && start.elapsed() < Duration::from_millis(200)
        {
            transport.update(Instant::now()).unwrap();
        }
        assert!(transport.shards.is_empty(), "no shard was made or asked");
        assert!(transport.routes.is_empty());

        // A connection request is routed to a new shard, and its address to that shard from then on.
        let mut clients = [Client::new(server, 1)];
        settle(&mut transport, &mut clients);
        assert!(clients[0].netcode.is_connected());
        let addr = clients[0].socket.local_addr().unwrap();
        assert!(matches!(transport.routes.get(&addr), Some(Route::Connected(_))));
        assert_eq!(transport.connections_from(addr.ip()), 1);
    }

    #[test]
    fn unfinished_handshakes_give_their_slot_back() {
        let mut transport = transport(2, 2);
        let server = transport.socket.local_addr().unwrap();
        let mut client = Client::new(server, 1);
        // Only the request: the client never answers the challenge.
        client.pump(Duration::ZERO);
        let start = Instant::now();
        while transport.routes.is_empty() && start.elapsed() < Duration::from_secs(1) {
            transport.update(Instant::now()).unwrap();
        }
        assert_eq!(transport.shards[0].used, 1, "the handshake holds a slot");
        transport.update(Instant::now() + HANDSHAKE_ROUTE).unwrap();
        assert!(transport.routes.is_empty());
        assert_eq!(transport.shards[0].used, 0);
        assert_eq!(transport.handshaking, 0);
    }

    #[test]
    fn handshakes_beyond_the_limit_are_dropped_before_netcode() {
        let mut transport = transport(8, 8);
        transport.handshake_limit = 1;
        let server = transport.socket.local_addr().unwrap();
        let mut first = Client::new(server, 1);
        first.pump(Duration::ZERO);
        let start = Instant::now();
        while transport.routes.is_empty() && start.elapsed() < Duration::from_secs(1) {
            transport.update(Instant::now()).unwrap();
        }
        assert_eq!(transport.handshaking, 1);
        let mut second = Client::new(server, 2);
        second.pump(Duration::ZERO);
        let second_addr = second.socket.local_addr().unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            transport.update(Instant::now()).unwrap();
        }
        assert!(!transport.routes.contains_key(&second_addr), "no route, no pending entry");
        assert_eq!(transport.handshaking, 1);
        // Once the first one connects, the next handshake is admitted.
        settle(&mut transport, std::slice::from_mut(&mut first));
        assert!(first.netcode.is_connected());
        assert_eq!(transport.handshaking, 0);
        settle(&mut transport, std::slice::from_mut(&mut second));
        assert!(second.netcode.is_connected());
    }
}
