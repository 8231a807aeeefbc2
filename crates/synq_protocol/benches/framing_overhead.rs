//! Interleaved A/B measurement of what `seal`/`open` cost on top of the raw cipher.
//!
//! On a shared, loaded machine, criterion's one-after-the-other groups drift by ±20 %; here each
//! round times a batch of raw operations and a batch of synq operations back to back (alternating
//! which goes first), and the overhead is the median of the per-round ratios.
//! Run: `cargo bench -p synq_protocol --bench framing_overhead`.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::hint::black_box;
use std::time::{Duration, Instant};
use synq_protocol::crypto::{Binding, SealKind, SessionKey};
use synq_protocol::{SessionId, ViewId};

fn time(batch: usize, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..batch {
        f();
    }
    start.elapsed() / batch as u32
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn compare(what: &str, size: usize, rounds: usize, mut raw: impl FnMut(), mut ours: impl FnMut()) {
    let batch = if rounds == 1 { 1 } else { (256 * 1024 / size).clamp(4, 2000) };
    let (mut raw_ns, mut our_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (r, o) = if round % 2 == 0 {
            let r = time(batch, &mut raw);
            (r, time(batch, &mut ours))
        } else {
            let o = time(batch, &mut ours);
            (time(batch, &mut raw), o)
        };
        raw_ns.push(r.as_nanos() as f64);
        our_ns.push(o.as_nanos() as f64);
        ratios.push(o.as_secs_f64() / r.as_secs_f64());
    }
    let (r, o, ratio) = (median(&mut raw_ns), median(&mut our_ns), median(&mut ratios));
    println!(
        "{what:5} {size:>8} B  raw {:>10.3} µs  synq {:>10.3} µs  overhead {:+6.1} %",
        r / 1e3,
        o / 1e3,
        (ratio - 1.0) * 100.0
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not (and may list targets):
    // then only check that everything runs, with one short round.
    let measuring = std::env::args().any(|a| a == "--bench");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let key = SessionKey::from_master(&[7; 32]);
    let raw = XChaCha20Poly1305::new(&[9u8; 32].into());
    let nonce = XNonce::from([3u8; 24]);
    let binding = Binding::SessionView(SessionId([1; 32]), ViewId(5));
    for size in [64, 4096, 1 << 20] {
        let rounds = match (measuring, size > 100_000) {
            (false, _) => 1,
            (true, true) => 60,
            (true, false) => 300,
        };
        let plaintext = vec![0xA5u8; size];
        compare(
            "seal",
            size,
            rounds,
            || drop(black_box(raw.encrypt(&nonce, black_box(&plaintext[..])).unwrap())),
            || drop(black_box(key.seal(SealKind::Event, &binding, black_box(&plaintext)))),
        );
        let raw_ct = raw.encrypt(&nonce, &plaintext[..]).unwrap();
        let sealed = key.seal(SealKind::Event, &binding, &plaintext);
        compare(
            "open",
            size,
            rounds,
            || drop(black_box(raw.decrypt(&nonce, black_box(&raw_ct[..])).unwrap())),
            || drop(black_box(key.open(SealKind::Event, &binding, black_box(&sealed)).unwrap())),
        );
    }
}
