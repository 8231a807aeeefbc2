//! The stable-Rust stand-in for the cargo-fuzz target in `fuzz/`: a few hundred thousand random
//! and mutated frames through every decoder. None may panic, none may exceed its limits, and
//! whatever decodes must survive an encode/decode round trip.

use std::borrow::Cow;
use synq_protocol::chunk::split;
use synq_protocol::codec::{self, Defragmenter, split_frame};
use synq_protocol::crypto::Sealed;
use synq_protocol::membership::{Challenge, MemberKey, MemberSignature};
use synq_protocol::wire::*;
use synq_protocol::{Limits, PersistentId, SessionId, ViewId, canonical_json, link::JoinLink};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sealed(len: usize) -> Sealed {
    Sealed { nonce: [7; 24], ciphertext: (0..len).map(|i| i as u8).collect() }
}

fn seeds() -> Vec<Vec<u8>> {
    let event = StampedEvent {
        time: 5,
        seq: 0xFFFF_FFF3,
        body: EventBody::View { sender: ViewId(3), sent: None, payload: sealed(20) },
    };
    let users = StampedEvent {
        time: 6,
        seq: 0xFFFF_FFF4,
        body: EventBody::Users { joined: vec![ViewId(1), ViewId(2)], left: vec![ViewId(9)], reset: true },
    };
    let signature = MemberSignature { r: [8; 32], s: [9; 32] };
    let record = SnapshotRecord { time: 1, seq: 2, vote: [1; 32], data: sealed(40), signature };
    let persist = PersistRecord { time: 3, vote: [2; 32], data: sealed(10), signature };
    let client = [
        ClientMessage::Join(Join {
            protocol: 1,
            app_id: "io.example.game".into(),
            api_key_proof: Some([6; 32]),
            session_id: SessionId([4; 32]),
            persistent_id: PersistentId([5; 32]),
            view_id: ViewId(77),
            tick_ms: 50,
            resume_after: Some(12),
            held_time: 0,
            member_key: MemberKey([7; 32]),
            signature,
        }),
        ClientMessage::Event(sealed(30).into()),
        ClientMessage::HashVote(HashVote {
            purpose: VotePurpose::Snapshot,
            time: 1,
            seq: 2,
            vote: [3; 32],
            parts: vec![],
        }),
        ClientMessage::SnapshotUpload(record.clone()),
        ClientMessage::PersistUpload(persist.clone()),
        ClientMessage::Ping(99),
        ClientMessage::Leave,
    ];
    let server = [
        ServerMessage::Sync(Sync {
            time: 10,
            seq: 11,
            tick_ms: 50,
            start: SyncStart::Snapshot(record),
            events: vec![
                event.clone(),
                users.clone(),
                StampedEvent { time: 7, seq: 1, body: EventBody::SnapshotRequest },
            ],
        }),
        ServerMessage::Sync(Sync {
            time: 0,
            seq: 0,
            tick_ms: 50,
            start: SyncStart::Fresh { persisted: Some(persist), persisted_damaged: Some("checksum".into()) },
            events: vec![],
        }),
        ServerMessage::Event(users),
        ServerMessage::Tick { time: 1234, seq: 9 },
        ServerMessage::Challenge(Challenge([3; 32])),
        ServerMessage::Tally(Tally {
            purpose: VotePurpose::Persist,
            time: 1,
            seq: 2,
            groups: vec![VoteGroup { vote: [1; 32], parts: vec![[2; 32]], views: vec![ViewId(1)] }],
            uploader: Some(ViewId(1)),
        }),
        ServerMessage::SnapshotAccepted { time: 1, seq: 2 },
        ServerMessage::PersistAccepted { vote: [0; 32] },
        ServerMessage::Pong(5),
        ServerMessage::Error(ErrorMessage { code: ErrorCode::TooLarge, message: "too large".into() }),
        ServerMessage::Consensus(SnapshotRecord {
            time: 3,
            seq: 4,
            vote: [5; 32],
            data: Sealed { nonce: [6; 24], ciphertext: vec![7; 48] },
            signature: MemberSignature::EMPTY,
        }),
    ];
    let mut seeds: Vec<Vec<u8>> = client.iter().map(codec::encode_client).collect();
    seeds.extend(server.iter().map(codec::encode_server));
    seeds.extend(split(3, &seeds[0].clone(), 16).iter().map(codec::encode_chunk));
    seeds.push(br#"{"b":[1,2.5,{"c":null}],"a":"x\u0001"}"#.to_vec());
    seeds.push(b"synq://example.org:5800/io.example.game/lobby%201#pw=abc".to_vec());
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0, 0xff, 0x7f, 0x80, rng.next() as u8][rng.below(5)];
            }
            2 => data.truncate(rng.below(len + 1)),
            3 => {
                let i = rng.below(len + 1);
                let extra: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(i..i, extra);
            }
            4 if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                data.drain(a.min(b)..a.max(b));
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(other.len() + 1);
                let at = rng.below(len + 1);
                data.truncate(at);
                data.extend_from_slice(&other[cut..]);
            }
            _ => data = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        }
    }
    data
}

fn exercise(data: &[u8], limits: &Limits, defrag: &mut Defragmenter) -> bool {
    let mut decoded = false;
    if let Ok(m) = codec::decode_client(data, limits) {
        assert_eq!(codec::decode_client(&codec::encode_client(&m), limits).unwrap(), m);
        decoded = true;
    }
    if let Ok(m) = codec::decode_server(data, limits) {
        assert_eq!(codec::decode_server(&codec::encode_server(&m), limits).unwrap(), m);
        decoded = true;
    }
    if let Ok(c) = codec::decode_chunk(data, limits) {
        assert_eq!(codec::decode_chunk(&codec::encode_chunk(&c), limits).unwrap(), c);
        decoded = true;
    }
    if let Ok(Some(frame)) = defrag.push(data) {
        let _ = codec::decode_server(&frame, limits);
    }
    assert!(defrag.in_flight_bytes() <= limits.max_frame_bytes);
    if let Ok(c) = canonical_json::canonicalize(data) {
        assert_eq!(canonical_json::canonicalize(&c).unwrap(), c);
    }
    if let Ok(link) = JoinLink::parse(&String::from_utf8_lossy(data)) {
        assert_eq!(JoinLink::parse(&link.to_string()).unwrap(), link);
    }
    decoded
}

#[test]
fn three_hundred_thousand_mutated_frames_never_panic() {
    let limits = Limits { max_frame_bytes: 1 << 16, max_chunks: 64, ..Limits::default() };
    let seeds = seeds();
    for seed in &seeds[..seeds.len() - 2] {
        let ok = codec::decode_client(seed, &limits).is_ok()
            || codec::decode_server(seed, &limits).is_ok()
            || codec::decode_chunk(seed, &limits).is_ok();
        assert!(ok, "seed does not decode");
    }
    let mut rng = Rng(0x5EED_0F5F_1A57_u64);
    let mut defrag = Defragmenter::new(&limits);
    let mut decoded = 0;
    const RUNS: usize = 300_000;
    for _ in 0..RUNS {
        let data = mutate(&mut rng, &seeds);
        decoded += usize::from(exercise(&data, &limits, &mut defrag));
    }
    // The mutations stay close enough to valid frames to reach deep into the decoders.
    assert!(decoded > RUNS / 50, "only {decoded} of {RUNS} mutated frames decoded");
}

#[test]
fn random_chunk_streams_stay_bounded() {
    let limits = Limits { max_frame_bytes: 4096, max_chunks: 32, ..Limits::default() };
    let mut rng = Rng(42);
    let frame = codec::encode_server(&ServerMessage::Tick { time: 7, seq: 3 });
    let mut big = frame.clone();
    big.resize(3000, 0);
    for _ in 0..2_000 {
        let mut defrag = Defragmenter::new(&limits);
        let mut messages = split_frame(big.clone(), rng.next() as u32 % 4, 200);
        messages.extend(split_frame(frame.clone(), 9, 10));
        for _ in 0..rng.below(6) {
            let i = rng.below(messages.len());
            let j = rng.below(messages[i].len());
            messages[i][j] ^= 1 << rng.below(8);
        }
        for _ in 0..messages.len() {
            let m = messages[rng.below(messages.len())].clone();
            if let Ok(Some(Cow::Owned(out))) = defrag.push(&m) {
                assert!(out.len() <= limits.max_frame_bytes);
            }
            assert!(defrag.in_flight_bytes() <= limits.max_frame_bytes);
        }
    }
}
