//! Hostile UDP traffic against the real `synq-reflector` process: the datagrams that crash
//! renetcode 2.0.0 (sent after a completed handshake, from the same socket) and thousands of
//! random ones leave it alive, quiet and serving; connections that never speak are closed after
//! `--join-timeout-ms`; `--max-connections-per-ip` refuses the connection beyond it.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use renet::RenetClient;
use renetcode::{ClientAuthentication, NetcodeClient};
use synq_protocol::Limits;
use synq_protocol::codec;
use synq_protocol::netcode_guard::check_client_bound;
use synq_protocol::udp::{CHANNEL, DEFAULT_PROTOCOL_ID, connection_config};
use synq_protocol::wire::{ClientMessage, ServerMessage};

mod common;
use common::ReflectorProcess;

/// Every wait in these tests gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(15);

/// A bare netcode + renet client on its own UDP socket, which can also send raw datagrams.
struct RawClient {
    socket: UdpSocket,
    server: SocketAddr,
    netcode: NetcodeClient,
    renet: RenetClient,
    last: Instant,
    received: Vec<ServerMessage>,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Starts the handshake from a socket bound to `local` (an IP address, port chosen by the OS).
    fn start(server: SocketAddr, local: &str, client_id: u64) -> Self {
        let socket = UdpSocket::bind(format!("{local}:0")).unwrap();
        socket.set_nonblocking(true).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let auth = ClientAuthentication::Unsecure {
            protocol_id: DEFAULT_PROTOCOL_ID,
            client_id,
            server_addr: server,
            user_data: None,
        };
        Self {
            socket,
            server,
            netcode: NetcodeClient::new(now, auth).unwrap(),
            renet: RenetClient::new(connection_config()),
            last: Instant::now(),
            received: Vec::new(),
            buffer: vec![0; 2048],
        }
    }

    /// Completes the handshake or panics.
    fn connect(server: SocketAddr, local: &str, client_id: u64) -> Self {
        let mut raw = Self::start(server, local, client_id);
        let deadline = Instant::now() + TIMEOUT;
        while !raw.netcode.is_connected() {
            assert!(Instant::now() < deadline, "client {client_id} could not connect");
            assert!(!raw.netcode.is_disconnected(), "client {client_id} was refused");
            raw.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        raw
    }

    fn pump(&mut self) {
        let now = Instant::now();
        let dt = now - self.last;
        self.last = now;
        self.renet.update(dt);
        loop {
            match self.socket.recv_from(&mut self.buffer) {
                Ok((len, addr)) => {
                    let datagram = &mut self.buffer[..len];
                    if addr == self.server
                        && check_client_bound(datagram).is_ok()
                        && let Some(payload) = self.netcode.process_packet(datagram)
                    {
                        self.renet.process_packet(payload);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("cannot receive: {e}"),
            }
        }
        if self.netcode.is_connected() {
            self.renet.set_connected();
        }
        if let Some((packet, addr)) = self.netcode.update(dt) {
            let _ = self.socket.send_to(packet, addr);
        }
        while let Some(frame) = self.renet.receive_message(CHANNEL) {
            let message = codec::decode_server(&frame, &Limits::default()).expect("the reflector sends valid frames");
            self.received.push(message);
        }
        if self.netcode.is_connected() {
            for packet in self.renet.get_packets_to_send() {
                if let Ok((addr, datagram)) = self.netcode.generate_payload_packet(&packet) {
                    let _ = self.socket.send_to(datagram, addr);
                }
            }
        }
    }

    fn send_datagram(&self, datagram: &[u8]) {
        // A full socket buffer only loses this datagram; what matters is what arrives.
        let _ = self.socket.send_to(datagram, self.server);
    }

    /// Sends a `Ping` and waits for the reflector's answer: a `Pong`, or the error that a
    /// message came before `Join`. Either proves the whole server stack still serves.
    fn round_trip(&mut self) -> ServerMessage {
        self.renet.send_message(CHANNEL, codec::encode_client(&ClientMessage::Ping(42)));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.pump();
            if let Some(message) = self.received.pop() {
                return message;
            }
            assert!(Instant::now() < deadline, "no answer from the reflector");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps until the reflector closed the netcode connection.
    fn wait_disconnected(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.netcode.is_disconnected() {
            assert!(Instant::now() < deadline, "the connection was not closed");
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps for `duration` (keep-alives flow both ways).
    fn idle(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A small deterministic generator (no dependency needed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn crash_datagrams_and_garbage_after_a_handshake_leave_the_reflector_serving_and_quiet() {
    let mut reflector = ReflectorProcess::start("garbage", &[]);
    let mut attacker = RawClient::connect(reflector.addr, "127.0.0.1", 1);
    // The connection is established on the server too (its first payload confirms it).
    attacker.round_trip();

    let mut crash_85 = vec![0x85];
    crash_85.extend_from_slice(&[0; 17]);
    let mut crash_95 = vec![0x95];
    crash_95.extend_from_slice(&[0; 17]);
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = XorShift(0x5EED_1234_ABCD_0001);
    for round in 0..4000u32 {
        if round % 500 == 0 {
            attacker.send_datagram(&crash_85);
            attacker.send_datagram(&crash_95);
        }
        let r = rng.next();
        let len = match r % 4 {
            0 => (r >> 8) as usize % 1500,
            // Around the sizes that matter: the minimum, the sequence and the MAC.
            _ => 1 + (r >> 8) as usize % 48,
        };
        let mut datagram: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(first) = datagram.first_mut()
            && r & 0x10 != 0
        {
            *first = (*first & 0xF0) | ((r >> 40) as u8 % 7); // a valid packet type
        }
        if r & 0x20 != 0 {
            let _ = stranger.send_to(&datagram, reflector.addr);
        } else {
            attacker.send_datagram(&datagram);
        }
        if round % 100 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Whatever was still queued gets processed.
    attacker.idle(Duration::from_millis(500));
    reflector.assert_alive();

    // The attacker's own connection is unharmed, and a newcomer is served.
    attacker.round_trip();
    let mut newcomer = RawClient::connect(reflector.addr, "127.0.0.1", 2);
    newcomer.round_trip();
    reflector.assert_alive();

    let log = reflector.log.lock().unwrap().clone();
    assert!(log.iter().all(|line| !line.contains("renetcode")), "renetcode's per-packet errors leak into the log");
    assert!(log.len() < 100, "{} log lines for 4,000 bad datagrams: {log:#?}", log.len());
    assert!(log.iter().any(|line| line.contains("malformed datagrams dropped")), "no report of the drops: {log:#?}");
}

#[test]
fn connections_that_never_join_are_closed_and_free_their_slots() {
    let reflector = ReflectorProcess::start("join-timeout", &["--max-clients", "8", "--join-timeout-ms", "500"]);
    let mut silent: Vec<RawClient> = (0..8).map(|i| RawClient::connect(reflector.addr, "127.0.0.1", 100 + i)).collect();
    // They keep the netcode connection alive (keep-alives) but never send a message.
    let deadline = Instant::now() + TIMEOUT;
    while silent.iter().any(|client| !client.netcode.is_disconnected()) {
        assert!(Instant::now() < deadline, "silent connections were not closed");
        for client in &mut silent {
            client.pump();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut newcomer = RawClient::connect(reflector.addr, "127.0.0.1", 200);
    newcomer.round_trip();
}

#[test]
fn the_connection_beyond_the_per_address_limit_is_refused() {
    let reflector = ReflectorProcess::start("per-ip", &["--max-connections-per-ip", "2", "--join-timeout-ms", "60000"]);
    let mut first = RawClient::connect(reflector.addr, "127.0.0.1", 300);
    let mut second = RawClient::connect(reflector.addr, "127.0.0.1", 301);
    // netcode completes the handshake; the reflector then disconnects it at once.
    let mut third = RawClient::start(reflector.addr, "127.0.0.1", 302);
    third.wait_disconnected();
    first.idle(Duration::from_millis(300));
    second.idle(Duration::from_millis(300));
    assert!(first.netcode.is_connected() && second.netcode.is_connected(), "the admitted connections stay");
    // The limit is per address: another loopback address is admitted.
    #[cfg(target_os = "linux")]
    {
        let mut other = RawClient::connect(reflector.addr, "127.0.0.2", 303);
        other.idle(Duration::from_millis(300));
        assert!(other.netcode.is_connected());
    }
}
