//! The network thread of one [`super::UdpConnection`]: the socket, netcode and renet live here.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use renet::{ConnectionConfig, RenetClient};
use renetcode::ClientAuthentication;
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::udp::{CHANNEL, CHANNEL_MEMORY_BYTES, ClientSocket, connection_config};
use synq_protocol::wire::ServerMessage;

/// The longest the thread sleeps: it wakes at least this often to take the app's frames, advance
/// renet and netcode (resends, keep-alives, timeouts).
const WAKE_EVERY: Duration = Duration::from_millis(1);

/// Acknowledgements (and resends) are flushed this often when the app queued nothing, and only
/// while something is owed ([`ClientSocket::owes_flush`]): flushing on every wake-up would send a
/// datagram a millisecond while anything arrives. (The reflector resends after 100 ms without an
/// ack.) An idle session's ticks are not acknowledged: an idle client sends only netcode's
/// keep-alives.
const ACK_FLUSH: Duration = Duration::from_millis(10);

/// Bytes renet may send per flush (its `available_bytes_per_tick`; the reflector's is
/// [`synq_protocol::udp::BYTES_PER_FLUSH`]). The thread flushes again at every wake-up (about
/// every millisecond) while the previous flush used this up, so a snapshot upload moves at up to
/// ≈ 64 MB/s: a 2 MB upload in ≈ 30 ms, in bursts small enough for the reflector's socket
/// buffer, which all its clients share.
const BYTES_PER_FLUSH: u64 = 64 * 1024;

/// What the thread sends the app.
pub(super) enum Inbound {
    /// A decoded message from the reflector.
    Message(Arc<ServerMessage>),
    /// The connection closed, for this reason; nothing follows.
    Closed(String),
}

/// The connection's state as the app sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum State {
    Connecting = 0,
    Connected = 1,
    Closed = 2,
}

/// What the thread publishes for the app, and the send budget they share.
#[derive(Debug)]
pub(super) struct Shared {
    state: AtomicU8,
    /// Whether the netcode handshake ever completed on this connection.
    established: AtomicBool,
    /// renet's RTT in seconds, as `f64` bits; 0 until measured.
    rtt_bits: AtomicU64,
    /// Bytes the app may still queue: renet's free channel memory minus the frames queued in the
    /// channel to the thread. The app takes from it when it queues a frame; the thread gives back
    /// what renet frees when the reflector acknowledges. A frame moved from the channel into renet
    /// leaves it unchanged.
    budget: AtomicUsize,
}

impl Shared {
    pub(super) fn new() -> Self {
        Self {
            state: AtomicU8::new(State::Connecting as u8),
            established: AtomicBool::new(false),
            rtt_bits: AtomicU64::new(0),
            budget: AtomicUsize::new(CHANNEL_MEMORY_BYTES),
        }
    }

    pub(super) fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Connecting,
            1 => State::Connected,
            _ => State::Closed,
        }
    }

    fn set_state(&self, state: State) {
        if state == State::Connected {
            self.established.store(true, Ordering::Relaxed);
        }
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Whether the connection was ever established (it may be closed since).
    pub(super) fn was_established(&self) -> bool {
        self.established.load(Ordering::Relaxed)
    }

    pub(super) fn rtt(&self) -> Option<Duration> {
        let rtt = f64::from_bits(self.rtt_bits.load(Ordering::Relaxed));
        (rtt.is_finite() && rtt > 0.0).then(|| Duration::from_secs_f64(rtt))
    }

    /// Takes `len` bytes from the send budget, if there are that many.
    pub(super) fn reserve(&self, len: usize) -> bool {
        self.budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |budget| budget.checked_sub(len)).is_ok()
    }

    /// Gives `len` bytes back to the send budget.
    pub(super) fn release(&self, len: usize) {
        self.budget.fetch_add(len, Ordering::AcqRel);
    }
}

/// Why the loop ended.
enum Stop {
    /// The connection failed; the app is told why.
    Failed(String),
    /// The app dropped its side: flush and say goodbye.
    AppGone,
}

fn random_client_id() -> u64 {
    use chacha20poly1305::aead::rand_core::RngCore;
    chacha20poly1305::aead::OsRng.next_u64()
}

/// The network thread's state: renet over netcode over the socket, and the channels to the app.
pub(super) struct Worker {
    client: RenetClient,
    transport: ClientSocket,
    /// Tick datagrams taken in by the last update, decoded, to deliver after its messages.
    ticks: Vec<Result<ServerMessage, String>>,
    limits: Limits,
    frames: Receiver<Vec<u8>>,
    inbound: Sender<Inbound>,
    shared: Arc<Shared>,
    /// When renet's and netcode's clocks were last advanced.
    last_update: Instant,
    /// Give up if not connected by then.
    connect_deadline: Option<Instant>,
    last_flush: Instant,
    /// Whether the last flush used renet's whole per-update byte allowance: there is more to send
    /// (a large frame going out), so flush again at the next wake-up.
    saturated: bool,
    /// renet's byte allowance per flush.
    bytes_per_flush: u64,
}

impl Worker {
    /// Sets up netcode (unsecure: payloads are sealed end to end) and renet on `socket`, for
    /// the reflector `connector` names.
    pub(super) fn new(
        connector: &super::UdpConnector,
        socket: UdpSocket,
        frames: Receiver<Vec<u8>>,
        inbound: Sender<Inbound>,
        shared: Arc<Shared>,
    ) -> Result<Self, String> {
        let authentication = ClientAuthentication::Unsecure {
            protocol_id: connector.protocol_id,
            client_id: random_client_id(),
            server_addr: connector.server_addr,
            user_data: None,
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        for (option, error) in synq_protocol::udp::enlarge_socket_buffers(&socket) {
            tracing::warn!("bevy_synq: could not set {option} on the UDP socket: {error}");
        }
        let transport = ClientSocket::new(now, authentication, socket)?;
        let config = ConnectionConfig { available_bytes_per_tick: BYTES_PER_FLUSH, ..connection_config() };
        let bytes_per_flush = config.available_bytes_per_tick;
        let started = Instant::now();
        Ok(Self {
            client: RenetClient::new(config),
            transport,
            ticks: Vec::new(),
            limits: connector.limits,
            frames,
            inbound,
            shared,
            last_update: started,
            connect_deadline: Some(started + connector.connect_timeout),
            last_flush: started,
            saturated: false,
            bytes_per_flush,
        })
    }

    /// The thread's body: serves the connection until it fails or the app drops its side.
    pub(super) fn run(mut self) {
        let stop = loop {
            if let Err(stop) = self.iterate() {
                break stop;
            }
            self.publish();
            wait(self.transport.socket(), WAKE_EVERY);
        };
        match stop {
            Stop::Failed(reason) => {
                self.transport.disconnect();
                self.shared.set_state(State::Closed);
                // After every message received before the failure: a final error is seen first.
                let _ = self.inbound.send(Inbound::Closed(reason));
            }
            Stop::AppGone => {
                self.linger(super::LINGER);
                self.transport.disconnect();
                self.shared.set_state(State::Closed);
            }
        }
    }

    /// One wake-up: takes the app's frames, advances renet and netcode, receives and delivers,
    /// and flushes what is due.
    fn iterate(&mut self) -> Result<(), Stop> {
        let (queued, app_gone) = self.take_frames();
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last_update);
        self.last_update = now;
        self.client.update(dt);
        let free_before = self.client.channel_available_memory(CHANNEL);
        let (limits, ticks) = (&self.limits, &mut self.ticks);
        let updated = self.transport.update(dt, &mut self.client, |frame| ticks.push(decode_tick(frame, limits)));
        // Acknowledgements free renet's memory: the app may queue that much more.
        let free_after = self.client.channel_available_memory(CHANNEL);
        if free_after > free_before {
            self.shared.release(free_after - free_before);
        }
        // Deliver what arrived before any failure, so a final error from the reflector is seen.
        while let Some(frame) = self.client.receive_message(CHANNEL) {
            let message = codec::decode_server(&frame, &self.limits)
                .map_err(|e| Stop::Failed(format!("undecodable message from the reflector: {e}")))?;
            if self.inbound.send(Inbound::Message(Arc::new(message))).is_err() {
                return Err(Stop::AppGone);
            }
        }
        // After the messages that arrived with them: a tick that overtook none of them applies.
        for tick in self.ticks.drain(..) {
            let tick = tick.map_err(Stop::Failed)?;
            if self.inbound.send(Inbound::Message(Arc::new(tick))).is_err() {
                return Err(Stop::AppGone);
            }
        }
        updated.map_err(|e| Stop::Failed(format!("disconnected: {e}")))?;
        if app_gone {
            return Err(Stop::AppGone);
        }
        if self.client.is_connected() {
            self.connect_deadline = None;
            let ack_due =
                now.saturating_duration_since(self.last_flush) >= ACK_FLUSH && self.transport.owes_flush(&self.client);
            if queued || self.saturated || ack_due {
                self.flush(now).map_err(|e| Stop::Failed(format!("cannot send: {e}")))?;
            }
        } else if self.connect_deadline.is_some_and(|deadline| now >= deadline) {
            return Err(Stop::Failed("no answer from the reflector".into()));
        }
        Ok(())
    }

    /// Moves the frames the app queued into renet. Returns whether there were any, and whether
    /// the app dropped its side (after the last of its frames).
    fn take_frames(&mut self) -> (bool, bool) {
        let mut queued = false;
        loop {
            match self.frames.try_recv() {
                Ok(frame) => {
                    queued = true;
                    // The app reserved the room in the budget; this holds unless renet's memory
                    // accounting surprises us, and then renet would disconnect on a send.
                    if self.client.can_send_message(CHANNEL, frame.len()) {
                        self.client.send_message(CHANNEL, frame);
                    } else {
                        tracing::warn!(
                            "bevy_synq: a message of {} bytes does not fit the UDP transport's send buffer; dropped",
                            frame.len()
                        );
                        self.shared.release(frame.len());
                    }
                }
                Err(TryRecvError::Empty) => return (queued, false),
                Err(TryRecvError::Disconnected) => return (queued, true),
            }
        }
    }

    fn flush(&mut self, now: Instant) -> Result<(), String> {
        let sent = self.transport.send_packets(&mut self.client)?;
        self.last_flush = now;
        self.saturated = sent * 2 >= self.bytes_per_flush;
        Ok(())
    }

    fn publish(&self) {
        let state = if self.client.is_connected() { State::Connected } else { State::Connecting };
        self.shared.set_state(state);
        self.shared.rtt_bits.store(self.client.rtt().to_bits(), Ordering::Relaxed);
    }

    /// After the app dropped its side: keeps sending for up to `limit` until the reflector has
    /// acknowledged everything queued (the session's `Leave` is sent right before a drop).
    fn linger(&mut self, limit: Duration) {
        if !self.client.is_connected() {
            return;
        }
        let deadline = Instant::now() + limit;
        loop {
            if self.flush(Instant::now()).is_err() {
                return;
            }
            if self.client.channel_available_memory(CHANNEL) == CHANNEL_MEMORY_BYTES || Instant::now() >= deadline {
                return;
            }
            wait(self.transport.socket(), WAKE_EVERY);
            let now = Instant::now();
            let dt = now.saturating_duration_since(self.last_update);
            self.last_update = now;
            self.client.update(dt);
            if self.transport.update(dt, &mut self.client, |_| {}).is_err() {
                return;
            }
            // Nobody reads them any more.
            while self.client.receive_message(CHANNEL).is_some() {}
        }
    }
}

/// A tick datagram's frame, decoded; anything but a tick is refused (only ticks may travel
/// outside the ordered channel).
fn decode_tick(frame: &[u8], limits: &Limits) -> Result<ServerMessage, String> {
    match codec::decode_server(frame, limits) {
        Ok(tick @ ServerMessage::Tick { .. }) => Ok(tick),
        Ok(_) => Err("the reflector sent a message other than a tick outside the channel".into()),
        Err(e) => Err(format!("undecodable tick from the reflector: {e}")),
    }
}

/// Waits until a datagram arrives on `socket` or `timeout` passed (on unix; elsewhere, sleeps).
fn wait(socket: &UdpSocket, timeout: Duration) {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut pollfd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // poll(2) counts whole milliseconds: round up, so a sub-millisecond wait still waits.
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pollfd` is valid for the call and the socket, borrowed for it, stays open.
        // An error (EINTR) just ends the wait early.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    }
    #[cfg(not(unix))]
    {
        let _ = socket;
        std::thread::sleep(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use synq_protocol::wire::{ErrorCode, ErrorMessage};

    #[test]
    fn only_ticks_are_taken_from_outside_the_channel() {
        let limits = Limits::default();
        let tick = ServerMessage::Tick { time: 40, seq: 3 };
        assert_eq!(decode_tick(&codec::encode_server(&tick), &limits), Ok(tick));
        let error = ServerMessage::Error(ErrorMessage { code: ErrorCode::ShuttingDown, message: "bye".into() });
        let refused = decode_tick(&codec::encode_server(&error), &limits).unwrap_err();
        assert!(refused.contains("other than a tick"), "{refused}");
        let garbage = decode_tick(&[0x53, 0x51, 0xff, 0xff, 1, 2, 3], &limits).unwrap_err();
        assert!(garbage.contains("undecodable tick"), "{garbage}");
    }
}
