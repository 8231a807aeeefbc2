//! A bare renet client speaking the codec, for the reflector's process tests: connects, joins
//! with a signed membership proof, sends frames and waits for what the reflector sends.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use renet::RenetClient;
use renetcode::ClientAuthentication;
use synq_protocol::codec;
use synq_protocol::crypto::{Sealed, SessionKey};
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::membership::{self, MemberSignature};
use synq_protocol::udp::{CHANNEL, ClientSocket, DEFAULT_PROTOCOL_ID, connection_config};
use synq_protocol::wire::{ClientMessage, ErrorCode, EventBody, Join, ServerMessage, StampedEvent};
use synq_protocol::{Limits, PROTOCOL_VERSION};

/// Every wait in these tests gives up after this long.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A bare renet client speaking the codec.
pub struct RawClient {
    pub client: RenetClient,
    pub transport: ClientSocket,
    pub last: Instant,
    pub received: Vec<ServerMessage>,
    /// How many of `received` were consumed by `wait_for`.
    pub cursor: usize,
    /// Why the transport failed, once it did.
    pub failed: Option<String>,
    /// How long `wait_for` waits.
    pub timeout: Duration,
}

impl RawClient {
    pub fn connect(addr: SocketAddr, client_id: u64) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let auth = ClientAuthentication::Unsecure {
            protocol_id: DEFAULT_PROTOCOL_ID,
            client_id,
            server_addr: addr,
            user_data: None,
        };
        let mut raw = Self {
            client: RenetClient::new(connection_config()),
            transport: ClientSocket::new(now, auth, socket).unwrap(),
            last: Instant::now(),
            received: Vec::new(),
            cursor: 0,
            failed: None,
            timeout: TIMEOUT,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !raw.client.is_connected() {
            assert!(Instant::now() < deadline, "client {client_id} could not connect");
            raw.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        raw
    }

    pub fn pump(&mut self) {
        let now = Instant::now();
        let dt = now - self.last;
        self.last = now;
        self.client.update(dt);
        let mut ticks = Vec::new();
        if let Err(e) = self.transport.update(dt, &mut self.client, |frame| ticks.push(frame.to_vec())) {
            self.failed.get_or_insert(e.to_string());
        }
        while let Some(frame) = self.client.receive_message(CHANNEL) {
            let message = codec::decode_server(&frame, &Limits::default()).expect("the reflector sends valid frames");
            self.received.push(message);
        }
        for frame in ticks {
            let tick = codec::decode_server(&frame, &Limits::default()).expect("the reflector sends valid ticks");
            assert!(matches!(tick, ServerMessage::Tick { .. }), "only ticks travel outside the channel: {tick:?}");
            self.received.push(tick);
        }
        if self.client.is_connected() {
            let _ = self.transport.send_packets(&mut self.client);
        }
    }

    pub fn send(&mut self, message: &ClientMessage) {
        self.send_raw(codec::encode_client(message));
    }

    /// Answers the reflector's challenge with `join`, signed.
    pub fn join(&mut self, mut join: Join) {
        let challenge = self.wait_for("Challenge", |m| match m {
            ServerMessage::Challenge(challenge) => Some(*challenge),
            _ => None,
        });
        membership::sign_join(&key(), &challenge, &mut join);
        self.send(&ClientMessage::Join(join));
    }

    pub fn send_raw(&mut self, frame: Vec<u8>) {
        self.client.send_message(CHANNEL, frame);
        let _ = self.transport.send_packets(&mut self.client);
    }

    /// Pumps until a message not seen yet matches; consumes everything up to it.
    pub fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&ServerMessage) -> Option<T>) -> T {
        self.wait_for_spinning(what, false, &mut pick)
    }

    pub fn wait_for_spinning<T>(
        &mut self,
        what: &str,
        spin: bool,
        pick: &mut impl FnMut(&ServerMessage) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + self.timeout;
        loop {
            while self.cursor < self.received.len() {
                self.cursor += 1;
                if let Some(found) = pick(&self.received[self.cursor - 1]) {
                    return found;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {:?}", self.received);
            if spin {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.pump();
        }
    }

    /// Reads whatever arrives for `duration`.
    pub fn pump_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
            self.pump();
        }
    }

    /// Waits until the reflector has closed the connection.
    pub fn wait_disconnected(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while self.failed.is_none() && !self.client.is_disconnected() {
            assert!(Instant::now() < deadline, "the connection was not closed");
            std::thread::sleep(Duration::from_millis(1));
            self.pump();
        }
    }
}

/// The key of the tests' session password.
pub fn key() -> SessionKey {
    SessionKey::from_master(&[5; 32])
}

pub fn join(view: u64) -> Join {
    Join {
        protocol: PROTOCOL_VERSION,
        app_id: "io.bevy-synq.tests".into(),
        api_key_proof: None,
        session_id: SessionId([7; 32]),
        persistent_id: PersistentId([8; 32]),
        view_id: ViewId(view),
        tick_ms: 50,
        resume_after: None,
        held_time: 0,
        member_key: key().member_key(),
        signature: MemberSignature::EMPTY,
    }
}

pub fn event(payload: &[u8]) -> ClientMessage {
    ClientMessage::Event(Sealed { nonce: [3; 24], ciphertext: payload.to_vec() }.into())
}

/// The stamped view event carrying `payload`.
pub fn view_event(payload: &'static [u8]) -> impl FnMut(&ServerMessage) -> Option<StampedEvent> {
    move |message| match message {
        ServerMessage::Event(stamped @ StampedEvent { body: EventBody::View { payload: sealed, .. }, .. })
            if sealed.ciphertext == payload =>
        {
            Some(stamped.clone())
        }
        _ => None,
    }
}

pub fn synced(message: &ServerMessage) -> Option<()> {
    matches!(message, ServerMessage::Sync(_)).then_some(())
}

pub fn error(code: ErrorCode) -> impl FnMut(&ServerMessage) -> Option<()> {
    move |message| matches!(message, ServerMessage::Error(e) if e.code == code).then_some(())
}
