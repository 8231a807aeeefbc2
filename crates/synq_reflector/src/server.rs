//! The network driver: the sans-IO [`Reflector`] behind a UDP socket, with renet for reliable,
//! ordered, fragmented messages and netcode for connections.
//!
//! [`UdpReflector::bind`] opens the socket; [`UdpReflector::run`] serves until a stop flag is set
//! and then shuts down gracefully (every client gets [`ErrorCode::ShuttingDown`]);
//! [`UdpReflector::run_once`] is one iteration of that loop, for callers that own the loop.
//!
//! # Wire
//!
//! The renet channel layout and protocol id of [`synq_protocol::udp`], which clients use too. The
//! channel memory, [`CHANNEL_MEMORY_BYTES`] per direction, bounds what one client can make the
//! reflector buffer (unacknowledged sends plus incomplete receives).
//!
//! # Security
//!
//! Connections use netcode's *unsecure* mode ([`ServerAuthentication::Unsecure`]): packets are
//! not encrypted or authenticated at the transport level and anyone who can reach the port can
//! connect. The payloads that matter are sealed end to end by the clients, so the reflector only
//! ever relays ciphertext; access control (connect tokens, API keys) is still to be done.
//!
//! # Latency
//!
//! Between iterations the loop waits for the socket to become readable, at most
//! [`UdpReflectorConfig::idle_sleep`] (1 ms by default, so that timers and renet's resends run),
//! and it answers in the iteration that received a message: no frame of latency is added, only
//! the wake-up and the work of one iteration. See `tests/udp_process.rs` (`ping_round_trip`).
//! When wake-ups that bring nothing but acks and keep-alives exceed 2,000 a second (many idle
//! clients), the loop sleeps 0.5 ms between iterations instead, and takes in what arrived in
//! batches: a message then waits up to 0.5 ms more. The core's timers (heartbeat ticks, batches,
//! tallies) run every 5 ms, since each run walks every session.
//! (On non-Unix systems it sleeps instead of waiting for readability.)
//!
//! # Hostile traffic
//!
//! Every datagram passes [`synq_protocol::netcode_guard`] before netcode sees it (netcode's own
//! parser panics on some malformed datagrams). Two limits bound what anyone with a UDP socket can
//! hold: a connection that has not joined within [`UdpReflectorConfig::join_timeout`] is closed
//! (otherwise a few silent connections hold every slot of `max_clients`), and an address may hold
//! at most [`UdpReflectorConfig::max_connections_per_ip`] connections. Dropped datagrams and
//! refused or expired connections are counted and logged at most once per cause every 10 s; the
//! binary also silences renetcode's one-error-per-packet logging and counts it instead
//! ([`netcode_error_counter`]).
//!
//! # Overload
//!
//! renet has no congestion control: a reliable message is resent every 100 ms until it is
//! acknowledged. Past the rate the reflector (or the machine) can carry, backlogs of unacknowledged
//! frames and their resends would crowd out new frames and grow without bound. So the reflector
//! sheds the excess at its input: a client's `Event` is refused, before the core stamps it, while
//! the client's own connection holds more than [`UdpReflectorConfig::max_sender_backlog_bytes`]
//! unacknowledged or queued bytes, counting the events its session admitted earlier in the same
//! pass (every member receives every event of its session, its own included, so its backlog
//! reflects the session's, and one pass over many senders adds to every member's). The sender is
//! told with
//! [`ErrorCode::RateLimited`] ("the reflector is overloaded; event dropped"), at most once per
//! [`OVERLOAD_NOTICE_EVERY`], and refusals are counted in the rate-limited log. Nothing stamped is
//! ever dropped: what was admitted reaches every member, in order.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use renet::Bytes;
use renet_netcode::{ServerAuthentication, ServerConfig};

mod hosting;
mod log_limit;
mod transport;
pub use hosting::{HostedReflector, reachable_addresses};
#[cfg(feature = "cli")]
pub use log_limit::netcode_error_counter;
use log_limit::{LogLimit, REPORT_EVERY};
use synq_protocol::codec::{self, DecodeError};
use synq_protocol::ids::SessionId;
use synq_protocol::udp::{CHANNEL_MEMORY_BYTES, DEFAULT_PROTOCOL_ID};
use synq_protocol::wire::{ClientMessage, ErrorCode, ErrorMessage, ServerMessage};
use transport::{Event, Transport};

use crate::core::{ClientId, Output, Reflector, ReflectorConfig};
use crate::storage::{DiskStorage, Storage, StorageError};

/// The address the binary listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5800";

/// Largest number of simultaneous connections: renetcode's server holds at most 1,024, so the
/// transport runs several of them (shards of 256) on the one socket.
pub const MAX_CLIENTS_LIMIT: usize = 32_768;

/// How long a closed client is given to acknowledge its final error before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How a [`UdpReflector`] listens and behaves.
#[derive(Clone, Debug)]
pub struct UdpReflectorConfig {
    /// The UDP address to bind.
    pub listen: SocketAddr,
    /// The netcode protocol id; clients must use the same.
    pub protocol_id: u64,
    /// Most simultaneous connections (at most [`MAX_CLIENTS_LIMIT`]).
    pub max_clients: usize,
    /// The longest wait for a datagram between iterations when [`UdpReflector::run`] drives it
    /// (a datagram ends the wait at once): timers and renet's resends run at least this often.
    /// Zero yields instead of waiting (busy loop).
    pub idle_sleep: Duration,
    /// The session logic's configuration.
    pub reflector: ReflectorConfig,
    /// Where sessions and persisted data are kept across restarts; in memory only when `None`.
    pub data_dir: Option<std::path::PathBuf>,
    /// Queued frames are flushed to the socket at most this often, so that at high rates several
    /// share a datagram per connection; zero flushes at once (lowest latency, most datagrams).
    pub frame_flush: Duration,
    /// A connection that has not joined a session (proved its membership) within this time is
    /// closed, so that idle connections cannot hold the slots of `max_clients` (default 5 s).
    pub join_timeout: Duration,
    /// Most simultaneous connections from one IP address; a connection beyond it is disconnected
    /// at once (default 16; zero refuses everyone).
    pub max_connections_per_ip: usize,
    /// Admission control: a client's event is refused with [`ErrorCode::RateLimited`] while its
    /// own connection holds more than this many unacknowledged or queued bytes (default
    /// [`DEFAULT_MAX_SENDER_BACKLOG_BYTES`]). See the module documentation's *Overload*.
    pub max_sender_backlog_bytes: usize,
}

/// The default [`UdpReflectorConfig::join_timeout`].
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The default [`UdpReflectorConfig::max_connections_per_ip`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 16;

/// The default [`UdpReflectorConfig::max_sender_backlog_bytes`], 64 KiB: what one connection
/// receives in ≈ 100 ms at ≈ 2,000 events a second of 300-byte frames, so a connection with a
/// 100 ms round trip still carries 32 members at the default 60 events a second each. The bound
/// is also about what an overloaded reflector's latency grows to (the backlog drains at the rate
/// the connection is acknowledged), and what renet resends per connection every 100 ms while acks
/// are late; on loopback past saturation 32–64 KiB delivered the most (128 KiB ≈ 35 % less,
/// no bound nothing at all).
pub const DEFAULT_MAX_SENDER_BACKLOG_BYTES: usize = 64 * 1024;

/// A client whose events are refused for overload is told so at most this often.
pub const OVERLOAD_NOTICE_EVERY: Duration = Duration::from_millis(500);

impl Default for UdpReflectorConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            protocol_id: DEFAULT_PROTOCOL_ID,
            max_clients: 256,
            idle_sleep: Duration::from_millis(1),
            reflector: ReflectorConfig::default(),
            data_dir: None,
            frame_flush: FRAME_FLUSH,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_sender_backlog_bytes: DEFAULT_MAX_SENDER_BACKLOG_BYTES,
        }
    }
}

/// Why the UDP reflector could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The socket could not be bound or configured.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// [`UdpReflector::bind_with_storage`] was given a configuration with a data directory too.
    #[error("a storage backend and a data directory were both given; choose one")]
    TwoStorages,
    /// `max_clients` is out of range.
    #[error("max clients must be between 1 and {MAX_CLIENTS_LIMIT}, not {0}")]
    MaxClients(usize),
    /// The socket failed while serving.
    #[error("transport error: {0}")]
    Transport(String),
}

/// The reflector on a UDP socket. See the module documentation.
pub struct UdpReflector {
    core: Reflector,
    transport: Transport,
    local_addr: SocketAddr,
    idle_sleep: Duration,
    /// Waits for the socket to become readable (the transport owns the socket itself).
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// The reflector clock's zero.
    epoch: Instant,
    /// When frames were last flushed to the socket.
    last_flush: Instant,
    /// When the core's timers last ran.
    last_poll: Instant,
    /// Loop iterations in the current [`QUIET_WINDOW`] that brought nothing but acks and
    /// keep-alives, and whether the loop sleeps instead of waking on each datagram.
    quiet_wakes: u32,
    quiet_since: Instant,
    coalesce: bool,
    /// Sessions held in memory at the last check, to give memory back once sessions unloaded.
    sessions_held: usize,
    last_trim: Instant,
    /// Connections with frames queued since the last flush.
    dirty: std::collections::HashSet<u64>,
    frame_flush: Duration,
    /// The transport's connection id → the core's id for that connection. Core ids are never
    /// reused, so a client that reconnects is a new connection to the core.
    by_renet: HashMap<u64, ClientId>,
    by_core: HashMap<ClientId, u64>,
    next_client: ClientId,
    /// Connections closed by the reflector, waiting for their final error to be acknowledged,
    /// with the time at which they are dropped anyway.
    closing: HashMap<u64, Instant>,
    /// Connections in the order they connected, with the time by which they must have joined a
    /// session (the timeout is the same for all, so the earliest deadline is at the front).
    join_deadline: VecDeque<(Instant, u64)>,
    join_timeout: Duration,
    /// The address of every admitted connection, and how many each address holds.
    ip_of: HashMap<u64, IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
    max_connections_per_ip: usize,
    max_sender_backlog_bytes: usize,
    /// When each connection whose events were refused for overload was last told so.
    overload_noticed: HashMap<u64, Instant>,
}

/// The core's timers (heartbeat ticks, join/leave batches, tallies) run this often: each run
/// walks every session, so it does not run on every loop iteration. Ticks are at most this late.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// Over each window this long, the loop counts the iterations that brought nothing but acks and
/// keep-alives; above [`QUIET_WAKES_MAX`] of them, it sleeps [`COALESCE`] between iterations
/// during the next window instead of waking on each datagram. Many idle clients then cost a few
/// thousand wake-ups a second, each taking in a batch of datagrams, instead of one per datagram.
const QUIET_WINDOW: Duration = Duration::from_millis(100);
const QUIET_WAKES_MAX: u32 = 200;
const COALESCE: Duration = Duration::from_micros(500);

/// Frames are flushed at most this often by default: at high rates several frames then share a
/// datagram per connection instead of each costing one (renet packs queued messages into packets).
pub const FRAME_FLUSH: Duration = Duration::from_micros(1000);

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl UdpReflector {
    /// Binds the socket and starts a reflector with no sessions, keeping them in
    /// [`UdpReflectorConfig::data_dir`] (in memory only without one).
    pub fn bind(config: UdpReflectorConfig) -> Result<Self, ServerError> {
        let data_dir = config.data_dir.clone();
        Self::bind_to(config, |_| match data_dir {
            Some(dir) => Ok(Some(Box::new(DiskStorage::open(&dir)?) as Box<dyn Storage>)),
            None => Ok(None),
        })
    }

    /// Binds the socket and starts a reflector with no sessions, keeping them in the storage
    /// `storage` makes once the socket is bound, from the address it is bound to (for example
    /// the `cluster` feature's `JetStreamStorage`, which several reflectors share and which
    /// advertises that address to the others). `config.data_dir` must be `None`.
    pub fn bind_with_storage(
        config: UdpReflectorConfig,
        storage: impl FnOnce(SocketAddr) -> Result<Box<dyn Storage>, StorageError>,
    ) -> Result<Self, ServerError> {
        if config.data_dir.is_some() {
            return Err(ServerError::TwoStorages);
        }
        Self::bind_to(config, |addr| storage(addr).map(Some))
    }

    fn bind_to(
        config: UdpReflectorConfig,
        storage: impl FnOnce(SocketAddr) -> Result<Option<Box<dyn Storage>>, StorageError>,
    ) -> Result<Self, ServerError> {
        if config.max_clients == 0 || config.max_clients > MAX_CLIENTS_LIMIT {
            return Err(ServerError::MaxClients(config.max_clients));
        }
        let bind_error = |source| ServerError::Bind { addr: config.listen, source };
        let socket = UdpSocket::bind(config.listen).map_err(bind_error)?;
        for (option, error) in synq_protocol::udp::enlarge_socket_buffers(&socket) {
            tracing::warn!(option, "could not enlarge the socket buffer: {error}");
        }
        let local_addr = socket.local_addr().map_err(bind_error)?;
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let netcode = ServerConfig {
            current_time: unix_now(),
            max_clients: config.max_clients,
            protocol_id: config.protocol_id,
            public_addresses: vec![local_addr],
            // Unsecure: no connect tokens, no transport encryption (payloads are sealed end to end).
            authentication: ServerAuthentication::Unsecure,
        };
        let transport = Transport::new(netcode, socket, LogLimit::new(REPORT_EVERY)).map_err(bind_error)?;
        let core = match storage(local_addr)? {
            Some(storage) => Reflector::with_storage(config.reflector, storage),
            None => Reflector::new(config.reflector),
        };
        let now = Instant::now();
        tracing::info!(%local_addr, max_clients = config.max_clients, protocol_id = config.protocol_id, "listening (UDP, netcode unsecure)");
        Ok(Self {
            core,
            transport,
            local_addr,
            idle_sleep: config.idle_sleep,
            #[cfg(unix)]
            fd,
            epoch: now,
            last_flush: now,
            last_poll: now,
            quiet_wakes: 0,
            quiet_since: now,
            coalesce: false,
            sessions_held: 0,
            last_trim: now,
            dirty: Default::default(),
            frame_flush: config.frame_flush,
            by_renet: HashMap::new(),
            by_core: HashMap::new(),
            next_client: 1,
            closing: HashMap::new(),
            join_deadline: VecDeque::new(),
            join_timeout: config.join_timeout,
            ip_of: HashMap::new(),
            per_ip: HashMap::new(),
            max_connections_per_ip: config.max_connections_per_ip,
            max_sender_backlog_bytes: config.max_sender_backlog_bytes,
            overload_noticed: HashMap::new(),
        })
    }

    /// The address the socket is bound to (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The session logic, for inspection.
    pub fn core(&self) -> &Reflector {
        &self.core
    }

    /// Number of open connections (joined to a session or not).
    pub fn connected_clients(&self) -> usize {
        self.transport.connected()
    }

    /// Serves until `stop` is set, then shuts down gracefully ([`UdpReflector::shutdown`]).
    /// Transport errors are logged and serving continues.
    pub fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.run_once(Instant::now()) {
                tracing::warn!("{e}");
            }
            self.wait();
        }
        self.shutdown(CLOSE_GRACE);
    }

    /// One iteration: receives what arrived, hands it to the core, fires due timers and sends the
    /// answers. `now` must not go backwards.
    pub fn run_once(&mut self, now: Instant) -> Result<(), ServerError> {
        let received = self.transport.update(now).map_err(|e| ServerError::Transport(e.to_string()));
        if !self.transport.has_news() {
            self.quiet_wakes += 1;
        }
        if now.saturating_duration_since(self.quiet_since) >= QUIET_WINDOW {
            self.coalesce = self.quiet_wakes > QUIET_WAKES_MAX;
            self.quiet_wakes = 0;
            self.quiet_since = now;
        }
        let t = self.millis(now);
        self.handle_events(t, now);
        self.receive(t, now);
        self.expire_joins(t, now);
        if now.saturating_duration_since(self.last_poll) >= POLL_EVERY {
            self.last_poll = now;
            self.core.poll(t);
        }
        self.release_memory(now);
        self.dispatch(t, now);
        self.finish_closing(now);
        // Frames go out at most every `frame_flush`, so that at high rates several share a
        // datagram; acks, resends and keep-alives go out when each connection's timer says so.
        if !self.dirty.is_empty() && now.saturating_duration_since(self.last_flush) >= self.frame_flush {
            let dirty: Vec<u64> = self.dirty.drain().collect();
            self.transport.flush(now, dirty);
            self.last_flush = now;
        }
        self.transport.run_timers(now);
        self.transport.send_queued();
        received
    }

    /// Sends every client [`ErrorCode::ShuttingDown`], waits up to `grace` for the errors to be
    /// acknowledged, then disconnects everyone.
    pub fn shutdown(&mut self, grace: Duration) {
        let start = Instant::now();
        let t = self.millis(start);
        let frame = Bytes::from(codec::encode_server(&ServerMessage::Error(ErrorMessage {
            code: ErrorCode::ShuttingDown,
            message: "the reflector is shutting down".into(),
        })));
        let clients = self.transport.ids();
        tracing::info!(clients = clients.len(), "shutting down");
        for id in &clients {
            if self.transport.can_send(*id, frame.len()) {
                self.transport.send_message(*id, frame.clone());
            }
            if let Some(client) = self.by_renet.get(id) {
                self.core.disconnect(t, *client);
            }
        }
        self.core.drain_outputs().for_each(drop);
        if let Err(error) = self.core.flush_storage(t) {
            tracing::error!(%error, "could not flush storage on shutdown");
        }
        self.transport.flush_all(start);
        self.transport.send_queued();
        while start.elapsed() < grace && clients.iter().any(|c| !self.transport.acknowledged(*c)) {
            std::thread::sleep(Duration::from_millis(1));
            let now = Instant::now();
            let _ = self.transport.update(now);
            for id in self.transport.take_readable() {
                while self.transport.receive_message(id).is_some() {}
            }
            self.transport.run_timers(now);
            self.transport.flush_all(now);
            self.transport.send_queued();
        }
        self.transport.disconnect_all(Instant::now());
        self.by_renet.clear();
        self.by_core.clear();
        self.closing.clear();
        self.join_deadline.clear();
        self.ip_of.clear();
        self.per_ip.clear();
        self.overload_noticed.clear();
    }

    /// Waits until a datagram arrives or [`UdpReflectorConfig::idle_sleep`] passed.
    fn wait(&self) {
        if self.coalesce && !self.idle_sleep.is_zero() {
            std::thread::sleep(COALESCE.min(self.idle_sleep));
            return;
        }
        if self.idle_sleep.is_zero() {
            std::thread::yield_now();
            return;
        }
        #[cfg(unix)]
        {
            let mut pollfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // poll(2) counts whole milliseconds: round up, so a sub-millisecond sleep still waits.
            let timeout_ms = self.idle_sleep.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `pollfd` is valid for the call and the socket (owned by the transport, which
            // lives as long as `self`) stays open. An error (EINTR) just ends the wait early.
            unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        }
        #[cfg(not(unix))]
        std::thread::sleep(self.idle_sleep);
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether everything sent to `renet` was acknowledged (or it is gone).
    fn acknowledged(&self, renet: u64) -> bool {
        !self.transport.is_connected(renet) || self.transport.acknowledged(renet)
    }

    fn handle_events(&mut self, t: u64, now: Instant) {
        while let Some(event) = self.transport.next_event() {
            match event {
                Event::Connected { id: renet, addr } => {
                    let ip = addr.ip();
                    let held = self.per_ip.entry(ip).or_default();
                    if *held >= self.max_connections_per_ip {
                        // Never admitted: its disconnection event finds no mapping.
                        self.transport.log.record("connections refused (per-address limit)", ip, now);
                        self.transport.disconnect(now, renet);
                        continue;
                    }
                    *held += 1;
                    self.ip_of.insert(renet, ip);
                    let client = self.next_client;
                    self.next_client += 1;
                    tracing::info!(client, connection = renet, %addr, "connected");
                    self.by_renet.insert(renet, client);
                    self.by_core.insert(client, renet);
                    self.join_deadline.push_back((now + self.join_timeout, renet));
                    self.core.connect_from(t, client, Some(ip));
                }
                Event::Disconnected { id: renet, reason } => {
                    self.closing.remove(&renet);
                    self.overload_noticed.remove(&renet);
                    if let Some(ip) = self.ip_of.remove(&renet)
                        && let Some(held) = self.per_ip.get_mut(&ip)
                    {
                        *held -= 1;
                        if *held == 0 {
                            self.per_ip.remove(&ip);
                        }
                    }
                    if let Some(client) = self.by_renet.remove(&renet) {
                        tracing::info!(client, connection = renet, %reason, "disconnected");
                        self.by_core.remove(&client);
                        self.core.disconnect(t, client);
                    }
                }
            }
        }
    }

    fn receive(&mut self, t: u64, now: Instant) {
        let limits = self.core.config().limits;
        let mut readable = self.transport.take_readable();
        readable.sort_unstable();
        readable.dedup();
        // The bytes of events each session admitted in this pass: each comes back to every member
        // of the session once dispatched, so they count towards every member's backlog already.
        let mut admitted_in: HashMap<SessionId, usize> = HashMap::new();
        for renet in readable {
            let Some(&client) = self.by_renet.get(&renet) else { continue };
            let session = self.core.session_of(client);
            loop {
                let admitted = session.and_then(|s| admitted_in.get(&s).copied()).unwrap_or(0);
                if self.closing.contains_key(&renet) {
                    // Anything a closing client still sends is ignored.
                    while self.transport.receive_message(renet).is_some() {}
                    break;
                }
                let Some(frame) = self.transport.receive_message(renet) else { break };
                match codec::decode_client(&frame, &limits) {
                    Ok(ClientMessage::Event(_)) if self.overloaded(renet, admitted) => {
                        self.refuse_event(t, now, client, renet)
                    }
                    Ok(message) => {
                        if let (ClientMessage::Event(_), Some(session)) = (&message, session) {
                            *admitted_in.entry(session).or_default() += frame.len();
                        }
                        self.core.handle(t, client, message)
                    }
                    Err(DecodeError::PayloadTooLarge { what, size, limit }) => {
                        // A well-formed message with an oversized payload: dropped, not final.
                        let message = format!("{what} of {size} bytes exceeds {limit} bytes; dropped");
                        tracing::debug!(client, "{message}");
                        let error = ServerMessage::Error(ErrorMessage { code: ErrorCode::TooLarge, message });
                        self.send_frame(t, now, client, renet, Bytes::from(codec::encode_server(&error)));
                    }
                    Err(e) => {
                        let code = if matches!(e, DecodeError::Version(_)) {
                            ErrorCode::ProtocolVersion
                        } else {
                            ErrorCode::Malformed
                        };
                        tracing::warn!(client, netcode_id = renet, "closing: {e}");
                        self.close(t, now, client, ErrorMessage { code, message: e.to_string() });
                    }
                }
            }
        }
        // Once for everything received: the events stamped meanwhile are recorded in one batch
        // per session before any of them leaves.
        self.dispatch(t, now);
    }

    /// Whether `renet`'s own connection holds (or will hold, with the `pending` bytes its session
    /// admitted but did not dispatch yet) more unacknowledged or queued bytes than an event from
    /// it may be admitted with.
    fn overloaded(&self, renet: u64, pending: usize) -> bool {
        self.transport.backlog(renet) + pending > self.max_sender_backlog_bytes
    }

    /// Drops an event refused for overload (before the core saw it: nothing is stamped), counts
    /// it, and tells the sender at most once per [`OVERLOAD_NOTICE_EVERY`].
    fn refuse_event(&mut self, t: u64, now: Instant, client: ClientId, renet: u64) {
        if let Some(&ip) = self.ip_of.get(&renet) {
            self.transport.log.record("events refused (the reflector is overloaded)", ip, now);
        }
        let due = self
            .overload_noticed
            .get(&renet)
            .is_none_or(|&at| now.saturating_duration_since(at) >= OVERLOAD_NOTICE_EVERY);
        if !due {
            return;
        }
        self.overload_noticed.insert(renet, now);
        let error = ServerMessage::Error(ErrorMessage {
            code: ErrorCode::RateLimited,
            message: "the reflector is overloaded; event dropped".into(),
        });
        self.send_frame(t, now, client, renet, Bytes::from(codec::encode_server(&error)));
    }

    /// Moves the core's outputs to the sockets. Each shared message is encoded once.
    fn dispatch(&mut self, t: u64, now: Instant) {
        let mut last: Option<(Arc<ServerMessage>, Bytes)> = None;
        loop {
            let outputs: Vec<Output> = self.core.drain_outputs().collect();
            if outputs.is_empty() {
                return;
            }
            for output in outputs {
                match output {
                    Output::Send { client, message } => {
                        let Some(&renet) = self.by_core.get(&client) else { continue };
                        let tick = matches!(*message, ServerMessage::Tick { .. });
                        let frame = match &last {
                            Some((cached, frame)) if Arc::ptr_eq(cached, &message) => frame.clone(),
                            _ => {
                                let frame = if tick {
                                    Bytes::from(synq_protocol::udp::tick_payload(&message))
                                } else {
                                    Bytes::from(codec::encode_server(&message))
                                };
                                last = Some((message, frame.clone()));
                                frame
                            }
                        };
                        if tick {
                            // Outside the channel, unacknowledged: see `synq_protocol::udp#ticks`.
                            if !self.closing.contains_key(&renet) {
                                self.transport.send_datagram(now, renet, &frame);
                            }
                        } else {
                            self.send_frame(t, now, client, renet, frame);
                        }
                    }
                    Output::Close { client, reason } => self.close(t, now, client, reason),
                }
            }
        }
    }

    fn send_frame(&mut self, t: u64, now: Instant, client: ClientId, renet: u64, frame: Bytes) {
        if self.closing.contains_key(&renet) {
            return;
        }
        if frame.len() > CHANNEL_MEMORY_BYTES {
            let message =
                format!("a message of {} bytes exceeds the transport's {CHANNEL_MEMORY_BYTES} bytes", frame.len());
            tracing::warn!(client, "closing: {message}");
            return self.close(t, now, client, ErrorMessage { code: ErrorCode::TooLarge, message });
        }
        if !self.transport.can_send(renet, frame.len()) {
            // It does not read what it is sent: drop it rather than buffer without bound.
            tracing::warn!(client, netcode_id = renet, "closing: the client does not keep up");
            self.closing.insert(renet, now);
            self.core.disconnect(t, client);
            return;
        }
        self.transport.send_message(renet, frame);
        self.dirty.insert(renet);
    }

    /// Sends `reason`, stops handling the client, and disconnects it once the error was
    /// acknowledged (or after a grace period).
    fn close(&mut self, t: u64, now: Instant, client: ClientId, reason: ErrorMessage) {
        let Some(&renet) = self.by_core.get(&client) else { return };
        if self.closing.contains_key(&renet) {
            return;
        }
        let frame = Bytes::from(codec::encode_server(&ServerMessage::Error(reason)));
        if self.transport.can_send(renet, frame.len()) {
            self.transport.send_message(renet, frame);
            self.dirty.insert(renet);
        }
        self.closing.insert(renet, now + CLOSE_GRACE);
        self.core.disconnect(t, client);
    }

    /// Gives the memory of unloaded sessions back to the operating system: glibc keeps freed heap
    /// memory for reuse, so without this a reflector's footprint stays at its peak.
    fn release_memory(&mut self, now: Instant) {
        let held = self.core.session_count();
        if held < self.sessions_held {
            if now.saturating_duration_since(self.last_trim) < Duration::from_secs(1) {
                return; // at most once a second: trimming walks the heap
            }
            self.last_trim = now;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free heap memory to the system; no pointer is touched.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        self.sessions_held = held;
    }

    /// Closes the connections that sent nothing within [`UdpReflectorConfig::join_timeout`].
    fn expire_joins(&mut self, t: u64, now: Instant) {
        while let Some(&(deadline, renet)) = self.join_deadline.front() {
            if now < deadline {
                break;
            }
            self.join_deadline.pop_front();
            let Some(&client) = self.by_renet.get(&renet) else { continue };
            if self.core.has_joined(client) {
                continue;
            }
            if let Some(&ip) = self.ip_of.get(&renet) {
                self.transport.log.record("connections closed for sending no Join in time", ip, now);
            }
            let message = format!("no Join within {} ms", self.join_timeout.as_millis());
            self.close(t, now, client, ErrorMessage { code: ErrorCode::NotJoined, message });
        }
    }

    fn finish_closing(&mut self, now: Instant) {
        let done: Vec<u64> = self
            .closing
            .iter()
            .filter(|(renet, until)| now >= **until || self.acknowledged(**renet))
            .map(|(r, _)| *r)
            .collect();
        for renet in done {
            // The `Disconnected` event then removes the mapping.
            self.transport.disconnect(now, renet);
            self.closing.remove(&renet);
        }
    }
}
