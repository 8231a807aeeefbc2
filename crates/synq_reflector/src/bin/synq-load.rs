//! `synq-load`: a load generator for the `synq-reflector` UDP reflector.
//!
//! It runs `S` sessions × `N` simulated clients, each a raw renet client (netcode, unsecure)
//! that joins its session and sends `E` events a second whose payload is `--payload-bytes` of
//! random "sealed" bytes (the reflector never opens them). The first 16 bytes of each payload carry
//! the sender, an event number and the send time (nanoseconds since an epoch shared by the whole
//! tool), so every receiver can tell how long the event took to reach it. An event's latency is
//! the time from its send until the *last* client of its session (the sender included) has it.
//!
//! ```text
//! # against a reflector started by the tool itself (the synq-reflector next to this binary)
//! synq-load --spawn --sessions 1 --clients 32 --rate 200 --seconds 10
//! # against a running reflector (give its pid to get its CPU use)
//! synq-load --reflector 127.0.0.1:5800 --reflector-pid 1234 --sessions 100 --clients 4
//! ```
//!
//! The run is: connect and join every client, `--warmup` seconds of load that are not measured,
//! `--seconds` of measured load, then at most `--drain-ms` for the last events to arrive. Events
//! *sent* in the measured window count. It prints per-second progress on stderr, then one summary
//! line and one Markdown table row on stdout (`--header` adds the table header):
//!
//! | column | meaning |
//! |---|---|
//! | p50 / p99 / max | send → delivered to every client of the session, over the window's events |
//! | delivered/s | deliveries (events × receivers) of the window's events, per second |
//! | reflector CPU | utime + stime of the reflector process over the window, % of one core |
//! | µs/delivery | reflector CPU time per delivered message |
//! | tool CPU | this tool's own CPU over the window (clients share the machine with the reflector) |
//!
//! Events that some client of the session has not received by the end are reported as
//! `incomplete` (they are not in the percentiles); a run with incomplete events, errors or
//! disconnections did not sustain its load. The clients answer the reflector's snapshot requests
//! (hash vote, and a small sealed snapshot when elected), so long runs do not fill its buffer.
//!
//! Loopback only, bounded: the tool stops by itself and stops the reflector it spawned.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use renet::RenetClient;
use renet_netcode::{ClientAuthentication, NetcodeClientTransport};
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::crypto::{Sealed, SessionKey};
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, Challenge, MemberSignature};
use synq_protocol::udp::{CHANNEL, DEFAULT_PROTOCOL_ID, connection_config};
use synq_protocol::wire::{
    ClientMessage, EventBody, HashVote, ServerMessage, SnapshotRecord, StampedEvent, VotePurpose,
};
use synq_reflector::server::MAX_CLIENTS_LIMIT;

/// Bytes of each payload taken by the measurement header (sender, event number, send time).
const HEADER_BYTES: usize = 16;

/// How long connecting and joining every client may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Load generator for synq-reflector: S sessions × N clients × E events/s, end-to-end latency.
#[derive(Parser, Debug, Clone)]
#[command(name = "synq-load", version, about)]
struct Args {
    /// Address of a running reflector (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:5800")]
    reflector: SocketAddr,
    /// Start a synq-reflector (the binary next to this one) on a free loopback port instead.
    #[arg(long)]
    spawn: bool,
    /// Extra argument for the spawned reflector (repeatable), e.g. `--reflector-arg=--idle-sleep-us=0`.
    #[arg(long = "reflector-arg", allow_hyphen_values = true)]
    reflector_args: Vec<String>,
    /// pid of the running reflector, to measure its CPU use (not needed with --spawn).
    #[arg(long)]
    reflector_pid: Option<u32>,
    /// Number of sessions (S).
    #[arg(long, short = 's', default_value_t = 1)]
    sessions: u32,
    /// Clients per session (N).
    #[arg(long, short = 'n', default_value_t = 2)]
    clients: u32,
    /// Events per second sent by each client (E).
    #[arg(long, short = 'e', default_value_t = 20.0)]
    rate: f64,
    /// Sealed payload size in bytes (ciphertext, after the 24-byte nonce); at least 16.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=16 * 1024))]
    payload_bytes: u32,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured load before the measured window, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Longest wait for the last events after sending stopped, ms.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// Threads that drive the clients (clients are spread round-robin).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// netcode protocol id (must match the reflector's).
    #[arg(long, default_value_t = DEFAULT_PROTOCOL_ID)]
    protocol_id: u64,
    /// Every client flushes (acks, resends, keep-alives) at least this often, in ms, even with
    /// nothing to send. Between flushes a client reads what arrives at once but only sends when it
    /// has messages: flushing on every datagram starts an ack ping-pong with the reflector, which
    /// answers every datagram with acks of its own. Keep it well under renet's 100 ms resend time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=80))]
    flush_ms: u64,
    /// Print the Markdown table header before the row.
    #[arg(long)]
    header: bool,
    /// No per-second progress on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// The record of one event: written by its sender, updated by every receiver.
#[derive(Default)]
struct Slot {
    /// Send time in ns since the epoch, plus one (0: not sent).
    sent: AtomicU64,
    /// Latest receive time in ns since the epoch.
    last_received: AtomicU64,
    /// How many clients received it.
    receivers: AtomicU32,
}

/// What all threads share.
struct Shared {
    epoch: Instant,
    /// One row of slots per sender (global client index).
    table: Vec<Box<[Slot]>>,
    /// Load starts at this offset from the epoch (ns), set once everyone joined.
    start_ns: AtomicU64,
    /// Set when the threads must stop (end of the run or failure).
    stop: AtomicBool,
    /// Set when something failed before the load started.
    abort: AtomicBool,
    /// Events sent, deliveries received (all, for progress and draining).
    sent: AtomicU64,
    delivered: AtomicU64,
    /// Sending stops at this offset (ns), set with `start_ns`.
    send_end_ns: AtomicU64,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// What a thread reports at the end.
#[derive(Default)]
struct ThreadStats {
    errors: BTreeMap<String, u64>,
    disconnected: u32,
    transport_errors: u64,
    /// Largest lateness of a send relative to its schedule.
    max_send_lag: Duration,
    /// Sends more than 1 ms late.
    late_sends: u64,
    snapshots_uploaded: u64,
    failure: Option<String>,
}

/// splitmix64: cheap random bytes for nonces and payloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// One simulated client.
struct LoadClient {
    renet: RenetClient,
    transport: NetcodeClientTransport,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// Global index: the sender id in payloads and the row of the table.
    index: u32,
    session: SessionId,
    view: ViewId,
    last_update: Instant,
    next_send: Instant,
    sent: u32,
    /// Messages were queued since the last flush.
    queued: bool,
    /// The next flush even with nothing queued.
    next_flush: Instant,
    flush_every: Duration,
    synced: bool,
    dead: bool,
    rng: Rng,
}

impl LoadClient {
    fn connect(args: &Args, addr: SocketAddr, index: u32, run: u64) -> Result<Self, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let auth = ClientAuthentication::Unsecure {
            protocol_id: args.protocol_id,
            client_id: run.wrapping_add(index as u64),
            server_addr: addr,
            user_data: None,
        };
        let transport = NetcodeClientTransport::new(now, auth, socket).map_err(|e| format!("netcode: {e}"))?;
        let session_index = index / args.clients;
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&run.to_le_bytes());
        id[8..12].copy_from_slice(&session_index.to_le_bytes());
        Ok(Self {
            renet: RenetClient::new(connection_config()),
            transport,
            #[cfg(unix)]
            fd,
            index,
            session: SessionId(id),
            view: ViewId(index as u64 % args.clients as u64 + 1),
            last_update: Instant::now(),
            next_send: Instant::now(),
            sent: 0,
            queued: false,
            next_flush: Instant::now(),
            flush_every: Duration::from_millis(args.flush_ms),
            synced: false,
            dead: false,
            rng: Rng(run ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)),
        })
    }

    /// The join answering `challenge`, signed with the load's session key.
    fn join_message(&self, challenge: &Challenge) -> ClientMessage {
        let persistent = PersistentId(self.session.0);
        let app = "io.bevy-synq.load";
        ClientMessage::Join(membership::member_join(load_key(), challenge, app, self.session, persistent, self.view))
    }

    fn send(&mut self, message: &ClientMessage) {
        self.renet.send_message(CHANNEL, codec::encode_client(message));
        self.queued = true;
    }

    /// Advances renet and reads the socket; returns when it finished.
    fn update(&mut self, stats: &mut ThreadStats) -> Instant {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last_update);
        self.last_update = now;
        self.renet.update(dt);
        if self.transport.update(dt, &mut self.renet).is_err() {
            stats.transport_errors += 1;
        }
        if !self.dead && self.renet.is_disconnected() {
            self.dead = true;
            stats.disconnected += 1;
        }
        now
    }

    fn flush(&mut self, stats: &mut ThreadStats) {
        self.queued = false;
        self.next_flush = self.last_update + self.flush_every;
        if self.renet.is_connected() && self.transport.send_packets(&mut self.renet).is_err() {
            stats.transport_errors += 1;
        }
    }

    /// Handles everything received; returns the number of view events.
    fn receive(&mut self, shared: &Shared, received_ns: u64, stats: &mut ThreadStats, limits: &Limits) -> u64 {
        let mut events = 0;
        while let Some(frame) = self.renet.receive_message(CHANNEL) {
            let message = match codec::decode_server(&frame, limits) {
                Ok(message) => message,
                Err(e) => {
                    *stats.errors.entry(format!("undecodable frame: {e}")).or_default() += 1;
                    continue;
                }
            };
            match message {
                ServerMessage::Event(StampedEvent { body: EventBody::View { payload, .. }, .. }) => {
                    events += 1;
                    record(shared, &payload.ciphertext, received_ns);
                }
                ServerMessage::Event(StampedEvent { time, seq, body: EventBody::SnapshotRequest }) => {
                    let vote = HashVote { purpose: VotePurpose::Snapshot, time, seq, vote: [0; 32], parts: vec![] };
                    self.send(&ClientMessage::HashVote(vote));
                }
                ServerMessage::Tally(tally)
                    if tally.purpose == VotePurpose::Snapshot && tally.uploader == Some(self.view) =>
                {
                    let mut nonce = [0; 24];
                    self.rng.fill(&mut nonce);
                    let mut ciphertext = vec![0; 1024];
                    self.rng.fill(&mut ciphertext);
                    let vote = tally.groups.first().map(|g| g.vote).unwrap_or([0; 32]);
                    let data = Sealed { nonce, ciphertext };
                    let signature = MemberSignature::EMPTY;
                    let mut record = SnapshotRecord { time: tally.time, seq: tally.seq, vote, data, signature };
                    membership::sign_snapshot(load_key(), &self.session, &mut record);
                    self.send(&ClientMessage::SnapshotUpload(record));
                    stats.snapshots_uploaded += 1;
                }
                ServerMessage::Challenge(challenge) => {
                    let join = self.join_message(&challenge);
                    self.send(&join);
                }
                ServerMessage::Sync(_) => self.synced = true,
                ServerMessage::Error(e) => *stats.errors.entry(format!("{:?}", e.code)).or_default() += 1,
                _ => {}
            }
        }
        events
    }

    /// Sends every event that is due; returns how many.
    fn send_due(
        &mut self,
        shared: &Shared,
        interval: Duration,
        end: Instant,
        payload: usize,
        stats: &mut ThreadStats,
    ) -> u64 {
        let mut count = 0;
        let row = &shared.table[self.index as usize];
        loop {
            let now = Instant::now();
            if self.next_send > now || self.next_send >= end || self.sent as usize >= row.len() {
                break;
            }
            let lag = now - self.next_send;
            stats.max_send_lag = stats.max_send_lag.max(lag);
            if lag > Duration::from_millis(1) {
                stats.late_sends += 1;
            }
            let mut nonce = [0; 24];
            self.rng.fill(&mut nonce);
            let mut ciphertext = vec![0; payload];
            self.rng.fill(&mut ciphertext[HEADER_BYTES..]);
            let sent_ns = shared.ns(Instant::now());
            ciphertext[..4].copy_from_slice(&self.index.to_le_bytes());
            ciphertext[4..8].copy_from_slice(&self.sent.to_le_bytes());
            ciphertext[8..16].copy_from_slice(&sent_ns.to_le_bytes());
            row[self.sent as usize].sent.store(sent_ns + 1, Ordering::Relaxed);
            self.send(&ClientMessage::Event(Sealed { nonce, ciphertext }.into()));
            self.sent += 1;
            self.next_send += interval;
            count += 1;
        }
        count
    }
}

/// Notes that an event reached one more receiver at `received_ns`.
fn record(shared: &Shared, payload: &[u8], received_ns: u64) {
    if payload.len() < HEADER_BYTES {
        return;
    }
    let sender = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    let number = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
    let Some(slot) = shared.table.get(sender).and_then(|row| row.get(number)) else { return };
    slot.last_received.fetch_max(received_ns, Ordering::Relaxed);
    slot.receivers.fetch_add(1, Ordering::Relaxed);
}

/// Waits for any of a thread's client sockets to become readable.
///
/// On Linux the sockets sit in an epoll set, so a wake-up costs O(ready sockets), not O(sockets);
/// the set's own descriptor is waited on with `ppoll` for a sub-millisecond timeout. Other Unix
/// systems `poll` every socket (millisecond timeouts); elsewhere it sleeps and reports all ready.
struct Waiter {
    #[cfg(target_os = "linux")]
    epoll: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    events: Vec<libc::epoll_event>,
    #[cfg(all(unix, not(target_os = "linux")))]
    fds: Vec<libc::pollfd>,
}

impl Waiter {
    #[cfg(target_os = "linux")]
    fn new(clients: &[LoadClient]) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        for (i, client) in clients.iter().enumerate() {
            let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
            // SAFETY: both descriptors are open; `event` is valid for the call.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, client.fd, &mut event) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Self { epoll, events: vec![libc::epoll_event { events: 0, u64: 0 }; clients.len().clamp(1, 1024)] })
    }

    #[cfg(all(unix, not(target_os = "linux")))]
    fn new(clients: &[LoadClient]) -> std::io::Result<Self> {
        Ok(Self { fds: clients.iter().map(|c| libc::pollfd { fd: c.fd, events: libc::POLLIN, revents: 0 }).collect() })
    }

    #[cfg(not(unix))]
    fn new(_clients: &[LoadClient]) -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Waits at most `timeout`; sets `ready[i]` for every readable client `i` (and clears the rest).
    fn wait(&mut self, timeout: Duration, ready: &mut [bool]) {
        ready.fill(false);
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = self.epoll.as_raw_fd();
            let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
            // SAFETY: `pollfd` and `ts` are valid for the call; the epoll descriptor is open. An
            // error (EINTR) just ends the wait early.
            let n = unsafe { libc::ppoll(&mut pollfd, 1, &ts, std::ptr::null()) };
            if n <= 0 {
                return;
            }
            // SAFETY: `events` has room for `len` entries; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(fd, self.events.as_mut_ptr(), self.events.len() as libc::c_int, 0) };
            for event in &self.events[..n.max(0) as usize] {
                if let Some(r) = ready.get_mut(event.u64 as usize) {
                    *r = true;
                }
            }
        }
        #[cfg(all(unix, not(target_os = "linux")))]
        {
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is valid for the call; the sockets stay open (their transports
            // outlive the waiter).
            unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
            for (r, fd) in ready.iter_mut().zip(&mut self.fds) {
                *r = fd.revents != 0;
                fd.revents = 0;
            }
        }
        #[cfg(not(unix))]
        {
            std::thread::sleep(timeout.min(Duration::from_micros(200)));
            ready.fill(true);
        }
    }
}

/// Drives `indices` clients until the run stops.
fn client_thread(
    args: Args,
    addr: SocketAddr,
    indices: Vec<u32>,
    run: u64,
    shared: Arc<Shared>,
    barrier: Arc<Barrier>,
) -> ThreadStats {
    let mut stats = ThreadStats::default();
    let limits = Limits::default();
    // Connect and join.
    let mut clients = Vec::with_capacity(indices.len());
    for &index in &indices {
        match LoadClient::connect(&args, addr, index, run) {
            Ok(client) => clients.push(client),
            Err(e) => {
                stats.failure = Some(format!("client {index}: {e}"));
                shared.abort.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while stats.failure.is_none() && !shared.abort.load(Ordering::Relaxed) {
        let mut all = true;
        for client in &mut clients {
            client.update(&mut stats);
            if client.renet.is_connected() && !client.synced {
                // The join leaves in answer to the reflector's challenge.
                client.receive(&shared, 0, &mut stats, &limits);
            }
            client.flush(&mut stats);
            all &= client.synced;
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            let missing = clients.iter().filter(|c| !c.synced).count();
            stats.failure = Some(format!("{missing} clients did not connect and join within {CONNECT_TIMEOUT:?}"));
            shared.abort.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    barrier.wait(); // everyone joined (or failed)
    barrier.wait(); // the main thread set the start
    if shared.abort.load(Ordering::Relaxed) {
        for client in &mut clients {
            client.transport.disconnect();
        }
        return stats;
    }
    let start = shared.epoch + Duration::from_nanos(shared.start_ns.load(Ordering::Relaxed));
    let end = shared.epoch + Duration::from_nanos(shared.send_end_ns.load(Ordering::Relaxed));
    let interval = if args.rate > 0.0 { Duration::from_secs_f64(1.0 / args.rate) } else { Duration::MAX / 4 };
    let mut phase = Rng(run ^ 0xABCD ^ indices.first().copied().unwrap_or(0) as u64);
    for client in &mut clients {
        client.sent = 0;
        let offset = if args.rate > 0.0 { (phase.next() % 1_000_000) as f64 / 1e6 / args.rate } else { 0.0 };
        client.next_send = start + Duration::from_secs_f64(offset);
        client.next_flush = start + client.flush_every.mul_f64((phase.next() % 1000) as f64 / 1000.0);
    }
    let payload = args.payload_bytes as usize;
    let flush_every = Duration::from_millis(args.flush_ms);

    let mut waiter = match Waiter::new(&clients) {
        Ok(waiter) => waiter,
        Err(e) => {
            stats.failure = Some(format!("cannot wait on the sockets: {e}"));
            shared.stop.store(true, Ordering::Relaxed);
            return stats;
        }
    };
    let mut ready = vec![false; clients.len()];
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wake = clients
            .iter()
            .filter(|c| !c.dead)
            .map(|c| if c.next_send < end { c.next_send.min(c.next_flush) } else { c.next_flush })
            .min()
            .unwrap_or(now + flush_every);
        let timeout = wake.saturating_duration_since(now).min(flush_every);
        waiter.wait(timeout, &mut ready);
        let now = Instant::now();
        let (mut sent, mut delivered) = (0, 0);
        for (client, &readable) in clients.iter_mut().zip(&ready) {
            let due = client.next_send <= now && client.next_send < end;
            let flush = client.next_flush <= now;
            if !(readable || due || flush) || client.dead {
                continue;
            }
            let at = client.update(&mut stats);
            delivered += client.receive(&shared, shared.ns(at), &mut stats, &limits);
            sent += client.send_due(&shared, interval, end, payload, &mut stats);
            if client.queued || flush {
                client.flush(&mut stats);
            }
        }
        if sent > 0 {
            shared.sent.fetch_add(sent, Ordering::Relaxed);
        }
        if delivered > 0 {
            shared.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
    }
    for client in &mut clients {
        client.transport.disconnect();
    }
    stats
}

/// A `synq-reflector` process started by the tool; stopped when dropped.
struct Spawned {
    child: Child,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl Spawned {
    fn start(args: &Args, max_clients: u32) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?.with_file_name("synq-reflector");
        let data_dir = std::env::temp_dir().join(format!("synq-load-{}", std::process::id()));
        let mut child = Command::new(&exe)
            .args(["--listen", "127.0.0.1:0", "--max-clients", &max_clients.to_string(), "--data-dir"])
            .arg(&data_dir)
            .args(&args.reflector_args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            lines.for_each(drop);
        });
        let mut spawned = Self { child, addr: "127.0.0.1:0".parse().expect("parses"), data_dir };
        let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "synq-reflector did not report its address")?;
        spawned.addr = line
            .rsplit("udp://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| format!("unexpected first line from synq-reflector: {line:?}"))?;
        Ok(spawned)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// utime + stime of a process, in seconds (Linux /proc).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    #[cfg(not(unix))]
    let hz = 100.0;
    Some(ticks as f64 / hz)
}

/// (busy, total) jiffies of the whole machine (Linux /proc/stat).
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The machine's UDP counters (Linux /proc/net/snmp): datagrams in, out, and dropped for a full
/// receive buffer.
fn udp_counters() -> Option<[u64; 3]> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let find = |name: &str| -> Option<u64> {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse().ok()
    };
    Some([find("InDatagrams")?, find("OutDatagrams")?, find("RcvbufErrors")?])
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The session key of every load session (one password; the reflector pins its member key).
fn load_key() -> &'static SessionKey {
    static KEY: std::sync::OnceLock<SessionKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| SessionKey::from_master(&[0x10; 32]))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(ok) => {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("synq-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the load; `Ok(false)` when the load was not sustained cleanly.
fn run(args: &Args) -> Result<bool, String> {
    let total = args.sessions.checked_mul(args.clients).filter(|t| *t > 0).ok_or("need at least one client")?;
    if total as usize > MAX_CLIENTS_LIMIT {
        return Err(format!("{total} clients exceed the reflector's limit of {MAX_CLIENTS_LIMIT}"));
    }
    if !(args.rate >= 0.0 && args.seconds > 0.0 && args.warmup >= 0.0) {
        return Err("rate, seconds and warmup must be positive".into());
    }
    let per_sender = (args.rate * (args.warmup + args.seconds) + args.rate + 16.0).ceil() as usize;
    if per_sender.saturating_mul(total as usize) > 100_000_000 {
        return Err("too many events for the bookkeeping (rate × duration × clients > 1e8)".into());
    }
    let spawned = if args.spawn { Some(Spawned::start(args, total.max(2))?) } else { None };
    let addr = spawned.as_ref().map_or(args.reflector, |s| s.addr);
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address; synq-load only loads loopback"));
    }
    let reflector_pid = spawned.as_ref().map(|s| s.child.id()).or(args.reflector_pid).map(|p| p.to_string());
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "));

    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        table: (0..total).map(|_| (0..per_sender).map(|_| Slot::default()).collect()).collect(),
        start_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        send_end_ns: AtomicU64::new(0),
    });
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        ^ ((std::process::id() as u64) << 40);
    let run_id = run_id & !0xFFFF; // room for the client index in netcode ids
    let threads = args.threads.min(total);
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let connect_start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let indices: Vec<u32> = (t..total).step_by(threads as usize).collect();
            let (args, shared, barrier) = (args.clone(), shared.clone(), barrier.clone());
            std::thread::Builder::new()
                .name(format!("synq-load-{t}"))
                .spawn(move || client_thread(args, addr, indices, run_id, shared, barrier))
                .expect("thread starts")
        })
        .collect();
    barrier.wait();
    let connect_time = connect_start.elapsed();
    let start = Instant::now() + Duration::from_millis(20);
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let window_end = window_start + Duration::from_secs_f64(args.seconds);
    shared.start_ns.store(shared.ns(start), Ordering::Relaxed);
    shared.send_end_ns.store(shared.ns(window_end), Ordering::Relaxed);
    barrier.wait();
    if shared.abort.load(Ordering::Relaxed) {
        let failures: Vec<String> = handles.into_iter().filter_map(|h| h.join().ok().and_then(|s| s.failure)).collect();
        return Err(failures.join("; "));
    }
    if !args.quiet {
        eprintln!("synq-load: {total} clients connected and joined in {connect_time:.2?}; load starts");
    }

    // Progress, and CPU samples at the window's edges.
    let progress = |label: &str, last: &mut (Instant, u64, u64, Option<f64>)| {
        let now = Instant::now();
        let (sent, delivered) = (shared.sent.load(Ordering::Relaxed), shared.delivered.load(Ordering::Relaxed));
        let cpu = reflector_pid.as_deref().and_then(cpu_seconds);
        let dt = (now - last.0).as_secs_f64();
        if !args.quiet && dt > 0.0 {
            let cpu_text = match (cpu, last.3) {
                (Some(b), Some(a)) => format!("{:.0} %", (b - a) / dt * 100.0),
                _ => "n/a".into(),
            };
            eprintln!(
                "  {label:>7}: sent {:>9.0}/s  delivered {:>10.0}/s  reflector CPU {cpu_text}",
                (sent - last.1) as f64 / dt,
                (delivered - last.2) as f64 / dt
            );
        }
        *last = (now, sent, delivered, cpu);
    };
    let mut last = (Instant::now(), 0, 0, reflector_pid.as_deref().and_then(cpu_seconds));
    let mut tick = start;
    while tick + Duration::from_secs(1) <= window_start {
        tick += Duration::from_secs(1);
        sleep_until(tick);
        progress("warm-up", &mut last);
    }
    sleep_until(window_start);
    let cpu_start = reflector_pid.as_deref().and_then(cpu_seconds);
    let self_start = cpu_seconds("self");
    let machine_start = machine_jiffies();
    let udp_start = udp_counters();
    let mut tick = window_start;
    while tick + Duration::from_secs(1) <= window_end {
        tick += Duration::from_secs(1);
        sleep_until(tick);
        progress("load", &mut last);
    }
    sleep_until(window_end);
    let cpu_end = reflector_pid.as_deref().and_then(cpu_seconds);
    let self_end = cpu_seconds("self");
    let machine_end = machine_jiffies();
    let udp_end = udp_counters();
    // Drain: wait until every sent event reached every receiver, or the drain time passed.
    let drain_end = Instant::now() + Duration::from_millis(args.drain_ms);
    while Instant::now() < drain_end {
        let expected = shared.sent.load(Ordering::Relaxed) * args.clients as u64;
        if shared.delivered.load(Ordering::Relaxed) >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut stats = ThreadStats::default();
    for handle in handles {
        let s = handle.join().map_err(|_| "a client thread panicked")?;
        for (k, v) in s.errors {
            *stats.errors.entry(k).or_default() += v;
        }
        stats.disconnected += s.disconnected;
        stats.transport_errors += s.transport_errors;
        stats.max_send_lag = stats.max_send_lag.max(s.max_send_lag);
        stats.late_sends += s.late_sends;
        stats.snapshots_uploaded += s.snapshots_uploaded;
    }
    drop(spawned);

    // Latencies of the events sent in the window.
    let (ws, we) = (shared.ns(window_start), shared.ns(window_end));
    let receivers = args.clients;
    let mut latencies = Vec::new();
    let (mut sent, mut incomplete, mut deliveries) = (0u64, 0u64, 0u64);
    for row in &shared.table {
        for slot in row.iter() {
            let s = slot.sent.load(Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            let s = s - 1;
            if s < ws || s >= we {
                continue;
            }
            sent += 1;
            let got = slot.receivers.load(Ordering::Relaxed);
            deliveries += got.min(receivers) as u64;
            if got >= receivers {
                latencies.push(slot.last_received.load(Ordering::Relaxed).saturating_sub(s));
            } else {
                incomplete += 1;
            }
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        ms(latencies[i])
    };
    let (p50, p99, max) = (pct(0.50), pct(0.99), latencies.last().map_or(f64::NAN, |&l| ms(l)));
    let secs = (window_end - window_start).as_secs_f64();
    let delivered_rate = deliveries as f64 / secs;
    let expected_rate = args.sessions as f64 * args.clients as f64 * args.rate * receivers as f64;
    let reflector_cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let tool_cpu = match (self_start, self_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let machine_busy = match (machine_start, machine_end) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0),
        _ => None,
    };
    let pct_text = |v: Option<f64>| v.map_or("n/a".to_string(), |c| format!("{:.0} %", c / secs * 100.0));
    let per_delivery = reflector_cpu.filter(|_| deliveries > 0).map(|c| c * 1e6 / deliveries as f64);
    let per_delivery_text = per_delivery.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let errors: u64 = stats.errors.values().sum();
    let udp_text = match (udp_start, udp_end) {
        (Some(a), Some(b)) => format!(
            "{:.0} in/s, {:.0} out/s, {} dropped (receive buffer full)",
            (b[0] - a[0]) as f64 / secs,
            (b[1] - a[1]) as f64 / secs,
            b[2] - a[2]
        ),
        _ => "n/a".into(),
    };
    let clean = incomplete == 0 && errors == 0 && stats.disconnected == 0 && sent > 0;

    println!(
        "synq-load: S={} N={} E={}/s payload={}B {secs:.0}s (+{}s warm-up) on {} cpus: sent {sent} ({:.0}/s), \
         delivered {deliveries} ({delivered_rate:.0}/s, {:.1} % of offered), latency p50 {p50:.3} ms p99 {p99:.3} ms \
         max {max:.3} ms, incomplete {incomplete}, errors {errors} {:?}, disconnected {}, reflector CPU {} \
         ({per_delivery_text} µs/delivery), tool CPU {}, machine busy {}, max send lag {:.2?} ({} sends > 1 ms late), \
         snapshots {}, UDP datagrams (whole machine) {udp_text}, loadavg before {}",
        args.sessions,
        args.clients,
        args.rate,
        args.payload_bytes,
        args.warmup,
        cpus(),
        sent as f64 / secs,
        if expected_rate > 0.0 { delivered_rate / expected_rate * 100.0 } else { 100.0 },
        stats.errors,
        stats.disconnected,
        pct_text(reflector_cpu),
        pct_text(tool_cpu),
        machine_busy.map_or("n/a".to_string(), |b| format!("{b:.0} % of {} cpus", cpus())),
        stats.max_send_lag,
        stats.late_sends,
        stats.snapshots_uploaded,
        loadavg.as_deref().unwrap_or("n/a"),
    );
    if args.header {
        println!(
            "| S | N | E/s | payload B | sent/s | delivered/s | p50 ms | p99 ms | max ms | reflector CPU | µs/delivery | tool CPU | incomplete | errors |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    println!(
        "| {} | {} | {} | {} | {:.0} | {delivered_rate:.0} | {p50:.3} | {p99:.3} | {max:.3} | {} | {per_delivery_text} | {} | {incomplete} | {} |",
        args.sessions,
        args.clients,
        args.rate,
        args.payload_bytes,
        sent as f64 / secs,
        pct_text(reflector_cpu),
        pct_text(tool_cpu),
        errors + stats.disconnected as u64,
    );
    Ok(clean)
}
