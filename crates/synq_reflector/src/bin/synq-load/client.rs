//! The simulated clients: raw renet clients that join a load session, send timed events and
//! record when every event reached each receiver.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use renet::RenetClient;
use renetcode::ClientAuthentication;
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::crypto::{Sealed, SessionKey};
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, Challenge, MemberSignature};
use synq_protocol::udp::{CHANNEL, ClientSocket, connection_config, enlarge_socket_buffers};
use synq_protocol::wire::{
    ClientMessage, EventBody, HashVote, ServerMessage, SnapshotRecord, StampedEvent, VotePurpose,
};

use crate::args::Args;

/// Bytes of each payload taken by the measurement header (sender, event number, send time).
const HEADER_BYTES: usize = 16;

/// How long connecting and joining every client may take (30 times as long under callgrind,
/// where the reflector checks each join's signature 30-50× slower).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The record of one event: written by its sender, updated by every receiver.
#[derive(Default)]
pub(crate) struct Slot {
    /// Send time in ns since the epoch, plus one (0: not sent).
    pub(crate) sent: AtomicU64,
    /// Latest receive time in ns since the epoch.
    pub(crate) last_received: AtomicU64,
    /// How many clients received it.
    pub(crate) receivers: AtomicU32,
}

/// How long connecting and joining every client may take.
pub(crate) fn connect_timeout(callgrind: bool) -> Duration {
    if callgrind { CONNECT_TIMEOUT * 30 } else { CONNECT_TIMEOUT }
}

/// What all threads share.
pub(crate) struct Shared {
    pub(crate) epoch: Instant,
    /// One row of slots per sender (global client index).
    pub(crate) table: Vec<Box<[Slot]>>,
    /// Load starts at this offset from the epoch (ns), set once everyone joined.
    pub(crate) start_ns: AtomicU64,
    /// Set when the threads must stop (end of the run or failure).
    pub(crate) stop: AtomicBool,
    /// Set when something failed before the load started.
    pub(crate) abort: AtomicBool,
    /// Events sent, deliveries received (all, for progress and draining).
    pub(crate) sent: AtomicU64,
    pub(crate) delivered: AtomicU64,
    /// Sending stops at this offset (ns), set with `start_ns`.
    pub(crate) send_end_ns: AtomicU64,
}

impl Shared {
    pub(crate) fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// What a thread reports at the end.
#[derive(Default)]
pub(crate) struct ThreadStats {
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) disconnected: u32,
    pub(crate) transport_errors: u64,
    /// Largest lateness of a send relative to its schedule.
    pub(crate) max_send_lag: Duration,
    /// Sends more than 1 ms late.
    pub(crate) late_sends: u64,
    pub(crate) snapshots_uploaded: u64,
    /// Connection attempts that failed while connecting and were tried again.
    pub(crate) connect_retries: u64,
    pub(crate) failure: Option<String>,
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
    transport: ClientSocket,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// Global index: the sender id in payloads and the row of the table.
    index: u32,
    /// How many connection attempts failed before this one.
    attempt: u8,
    session: SessionId,
    view: ViewId,
    last_update: Instant,
    next_send: Instant,
    sent: u32,
    /// Messages were queued since the last flush.
    queued: bool,
    /// The next flush of acks and resends, if any are owed, with nothing queued.
    next_flush: Instant,
    flush_every: Duration,
    synced: bool,
    dead: bool,
    rng: Rng,
}

impl LoadClient {
    /// Starts connecting client `index` of run `run` (its `attempt`-th try).
    fn connect(args: &Args, addr: SocketAddr, index: u32, run: u64, attempt: u8) -> Result<Self, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        // The same socket buffers as a real client's network thread (a scheduling gap of the
        // tool's threads would otherwise drop datagrams at the default ≈ 208 KiB).
        if let Some((option, e)) = enlarge_socket_buffers(&socket).into_iter().next() {
            return Err(format!("{option}: {e}"));
        }
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let auth = ClientAuthentication::Unsecure {
            protocol_id: args.protocol_id,
            client_id: run | (attempt as u64) << 32 | index as u64,
            server_addr: addr,
            user_data: None,
        };
        let transport = ClientSocket::new(now, auth, socket).map_err(|e| format!("netcode: {e}"))?;
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
            attempt,
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
        // Ticks are not counted: nothing here waits for session time.
        if self.transport.update(dt, &mut self.renet, |_| {}).is_err() {
            stats.transport_errors += 1;
        }
        if !self.dead && self.renet.is_disconnected() {
            self.dead = true;
            stats.disconnected += 1;
        }
        now
    }

    /// Sends what is queued, and acks or resends if any are owed (as bevy_synq's client does: an
    /// idle client sends nothing but netcode's keep-alives).
    fn flush(&mut self, stats: &mut ThreadStats) {
        let owed = self.queued || self.transport.owes_flush(&self.renet);
        self.queued = false;
        self.next_flush = self.last_update + self.flush_every;
        if owed && self.renet.is_connected() && self.transport.send_packets(&mut self.renet).is_err() {
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
pub(crate) fn client_thread(
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
        match LoadClient::connect(&args, addr, index, run, 0) {
            Ok(client) => clients.push(client),
            Err(e) => {
                stats.failure = Some(format!("client {index}: {e}"));
                shared.abort.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    let connect_timeout = connect_timeout(args.callgrind);
    let deadline = Instant::now() + connect_timeout;
    while stats.failure.is_none() && !shared.abort.load(Ordering::Relaxed) {
        let mut all = true;
        for client in &mut clients {
            client.update(&mut stats);
            if client.dead && client.attempt < u8::MAX {
                // netcode gave up on this attempt (a reflector under valgrind may answer too
                // late): it is not a disconnection of the run; try again with a new socket.
                stats.disconnected -= 1;
                stats.connect_retries += 1;
                match LoadClient::connect(&args, addr, client.index, run, client.attempt + 1) {
                    Ok(retry) => *client = retry,
                    Err(e) => {
                        stats.failure = Some(format!("client {}: {e}", client.index));
                        shared.abort.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                all = false;
                continue;
            }
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
            let connected = clients.iter().filter(|c| !c.synced && c.renet.is_connected()).count();
            stats.failure = Some(format!(
                "{missing} clients did not connect and join within {connect_timeout:?} ({connected} of them \
                 connected but not joined; {} connection attempts retried; errors from the reflector: {:?})",
                stats.connect_retries, stats.errors
            ));
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
        // Without a rate nothing is ever due (an idle run sends no events at all).
        client.next_send = if args.rate > 0.0 { start + Duration::from_secs_f64(offset) } else { end };
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
/// The session key of every load session (one password; the reflector pins its member key).
fn load_key() -> &'static SessionKey {
    static KEY: std::sync::OnceLock<SessionKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| SessionKey::from_master(&[0x10; 32]))
}
