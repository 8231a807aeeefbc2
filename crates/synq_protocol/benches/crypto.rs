//! Sealing and opening against the raw XChaCha20-Poly1305 cipher, and the Argon2id key derivation.
//!
//! `raw` encrypts with a fixed nonce and no associated data: the cipher alone. `seal` adds what
//! synq_protocol does around it: a fresh OsRng nonce, the associated data (kind and binding) and
//! the `Sealed` value. `open` is compared with a raw decrypt the same way.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use synq_protocol::crypto::{Binding, KdfParams, SealKind, SessionKey};
use synq_protocol::{PersistentId, SessionId, ViewId};

const SIZES: [(usize, &str); 3] = [(64, "64B"), (4096, "4KiB"), (1 << 20, "1MiB")];

fn seal_open(c: &mut Criterion) {
    let key = SessionKey::from_master(&[7; 32]);
    let raw = XChaCha20Poly1305::new(&[9u8; 32].into());
    let nonce = XNonce::from([3u8; 24]);
    let binding = Binding::SessionView(SessionId([1; 32]), ViewId(5));
    for (size, label) in SIZES {
        let plaintext = vec![0xA5u8; size];
        let mut group = c.benchmark_group(format!("seal/{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("raw_xchacha20poly1305", label), |b| {
            b.iter(|| raw.encrypt(&nonce, black_box(&plaintext[..])).unwrap())
        });
        group.bench_function(BenchmarkId::new("synq_seal", label), |b| {
            b.iter(|| key.seal(SealKind::Event, &binding, black_box(&plaintext)))
        });
        group.finish();

        let raw_ct = raw.encrypt(&nonce, &plaintext[..]).unwrap();
        let sealed = key.seal(SealKind::Event, &binding, &plaintext);
        let mut group = c.benchmark_group(format!("open/{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("raw_xchacha20poly1305", label), |b| {
            b.iter(|| raw.decrypt(&nonce, black_box(&raw_ct[..])).unwrap())
        });
        group.bench_function(BenchmarkId::new("synq_open", label), |b| {
            b.iter(|| key.open(SealKind::Event, &binding, black_box(&sealed)).unwrap())
        });
        group.finish();
    }
}

fn argon2id(c: &mut Criterion) {
    let mut group = c.benchmark_group("argon2id");
    group.sample_size(10);
    group.bench_function("derive_recommended_19MiB_t2_p1", |b| {
        b.iter(|| {
            SessionKey::derive(black_box("correct horse"), &PersistentId([2; 32]), KdfParams::RECOMMENDED).unwrap()
        })
    });
    group.finish();
}

/// What membership costs: the client signs its join once per connection, the reflector verifies
/// it (and every snapshot and persisted-data upload).
fn membership(c: &mut Criterion) {
    use synq_protocol::membership::{Challenge, MemberSignature, join_transcript, sign_join, verify};
    use synq_protocol::wire::Join;
    let key = SessionKey::from_master(&[7; 32]);
    let challenge = Challenge([1; 32]);
    let mut join = Join {
        protocol: synq_protocol::PROTOCOL_VERSION,
        app_id: "io.example.game".into(),
        api_key_proof: None,
        session_id: SessionId([2; 32]),
        persistent_id: PersistentId([3; 32]),
        view_id: ViewId(4),
        tick_ms: 50,
        resume_after: None,
        held_time: 0,
        member_key: key.member_key(),
        signature: MemberSignature::EMPTY,
    };
    let mut group = c.benchmark_group("membership");
    group.bench_function("sign_join", |b| b.iter(|| sign_join(&key, black_box(&challenge), &mut join)));
    sign_join(&key, &challenge, &mut join);
    group.bench_function("verify_join", |b| {
        b.iter(|| verify(&join.member_key, &join_transcript(black_box(&challenge), &join), &join.signature))
    });
    group.finish();
}

criterion_group!(benches, seal_open, argon2id, membership);
criterion_main!(benches);
