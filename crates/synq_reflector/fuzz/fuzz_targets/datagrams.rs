//! Raw datagrams, as anyone with a UDP socket can send them, fed to renetcode's server and client
//! after an in-memory handshake, through `synq_protocol::netcode_guard` as the reflector and the
//! client do. The property: nothing panics.
//!
//! Input: records of `[flags][len: u16 LE][len bytes]`. Flags: bit 0 → to the client (else to the
//! server); bit 1 → to the server from a stranger's address (else from the connected client's);
//! bit 2 → "sealed": the bytes are `[packet type][body]`, encrypted with the right key and a
//! fresh sequence, so that renetcode's parsing *after* decryption is exercised too; bit 3 →
//! advance both clocks by `flags >> 4` × 100 ms afterwards (keep-alives, timeouts).
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use libfuzzer_sys::fuzz_target;
use renetcode::{
    ClientAuthentication, ConnectToken, NETCODE_MAX_PACKET_BYTES, NetcodeClient, NetcodeServer, ServerAuthentication,
    ServerConfig, ServerResult,
};
use synq_protocol::netcode_guard::{check_client_bound, check_server_bound};

const PROTOCOL_ID: u64 = 0x5359_4e51_0000_0001;
const START: Duration = Duration::from_secs(1_000_000);

struct Pair {
    server: NetcodeServer,
    client: NetcodeClient,
    token: ConnectToken,
    client_addr: SocketAddr,
    sequence: u64,
}

/// What the server answers is handed to the client, as a socket would.
fn deliver(result: ServerResult<'_, '_>, client: &mut NetcodeClient) {
    match result {
        ServerResult::PacketToSend { payload, .. }
        | ServerResult::ClientConnected { payload, .. }
        | ServerResult::ClientDisconnected { payload: Some(payload), .. } => {
            let mut copy = payload.to_vec();
            client.process_packet(&mut copy);
        }
        _ => {}
    }
}

/// A server and a client that completed netcode's handshake (the server in unsecure mode, whose
/// connect key is all zeros, so the test knows the token's keys) and exchanged a payload.
fn connected() -> Pair {
    let server_addr: SocketAddr = "127.0.0.1:5800".parse().unwrap();
    let client_addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let server = NetcodeServer::new(ServerConfig {
        current_time: START,
        max_clients: 4,
        protocol_id: PROTOCOL_ID,
        public_addresses: vec![server_addr],
        authentication: ServerAuthentication::Unsecure,
    });
    let token = ConnectToken::generate(START, PROTOCOL_ID, 300, 7, 15, vec![server_addr], None, &[0; 32]).unwrap();
    let client = NetcodeClient::new(START, ClientAuthentication::Secure { connect_token: token.clone() }).unwrap();
    let mut pair = Pair { server, client, token, client_addr, sequence: 1 << 20 };
    for _ in 0..8 {
        if pair.client.is_connected() {
            break;
        }
        pair.server.update(Duration::from_millis(300));
        if let Some((packet, _)) = pair.client.update(Duration::from_millis(300)) {
            let mut packet = packet.to_vec();
            let result = pair.server.process_packet(client_addr, &mut packet);
            deliver(result, &mut pair.client);
        }
    }
    assert!(pair.client.is_connected(), "the in-memory handshake failed");
    let (_, packet) = pair.client.generate_payload_packet(b"hello").unwrap();
    let mut packet = packet.to_vec();
    assert!(matches!(pair.server.process_packet(client_addr, &mut packet), ServerResult::Payload { .. }));
    let (_, packet) = pair.server.generate_payload_packet(7, b"welcome").unwrap();
    let mut packet = packet.to_vec();
    assert_eq!(pair.client.process_packet(&mut packet), Some(&b"welcome"[..]));
    pair
}

/// `[type][body]` as a correctly sealed netcode packet (prefix, sequence, body, MAC).
fn seal(bytes: &[u8], sequence: u64, key: &[u8; 32]) -> Vec<u8> {
    let Some((&kind, body)) = bytes.split_first() else { return Vec::new() };
    let sequence_bytes = (8 - sequence.leading_zeros() as usize / 8).min(8);
    let prefix = (kind & 0x0F) | ((sequence_bytes as u8) << 4);
    let mut aad = [0u8; 22];
    aad[..13].copy_from_slice(b"NETCODE 1.02\0");
    aad[13..21].copy_from_slice(&PROTOCOL_ID.to_le_bytes());
    aad[21] = prefix;
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&sequence.to_le_bytes());
    let mut sealed = body[..body.len().min(NETCODE_MAX_PACKET_BYTES - 25)].to_vec();
    let tag = ChaCha20Poly1305::new(key.into()).encrypt_in_place_detached(&nonce.into(), &aad, &mut sealed).unwrap();
    let mut datagram = vec![prefix];
    datagram.extend_from_slice(&sequence.to_le_bytes()[..sequence_bytes]);
    datagram.extend_from_slice(&sealed);
    datagram.extend_from_slice(&tag);
    datagram
}

fn guard_passes(to_client: bool, datagram: &[u8]) -> bool {
    if cfg!(feature = "unguarded") {
        return true;
    }
    if to_client { check_client_bound(datagram).is_ok() } else { check_server_bound(datagram).is_ok() }
}

fuzz_target!(|data: &[u8]| {
    let mut pair = connected();
    let stranger: SocketAddr = "127.0.0.2:40001".parse().unwrap();
    let mut rest = data;
    while rest.len() >= 3 {
        let flags = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let to_client = flags & 1 != 0;
        let mut datagram = if flags & 4 != 0 {
            pair.sequence += 1;
            let key = if to_client { &pair.token.server_to_client_key } else { &pair.token.client_to_server_key };
            seal(bytes, pair.sequence, key)
        } else {
            bytes.to_vec()
        };
        datagram.truncate(NETCODE_MAX_PACKET_BYTES);
        if guard_passes(to_client, &datagram) {
            if to_client {
                pair.client.process_packet(&mut datagram);
            } else {
                let from = if flags & 2 != 0 { stranger } else { pair.client_addr };
                let result = pair.server.process_packet(from, &mut datagram);
                deliver(result, &mut pair.client);
            }
        }
        if flags & 8 != 0 {
            let step = Duration::from_millis(100 * u64::from(flags >> 4));
            pair.server.update(step);
            for id in pair.server.clients_id() {
                let result = pair.server.update_client(id);
                deliver(result, &mut pair.client);
            }
            pair.client.update(step);
        }
    }
});
