//! Append latency of the reflector's storage backends: `DiskStorage` (a temporary directory) and
//! `JetStreamStorage` (a running NATS JetStream cluster), one event per append (what the
//! reflector appends for a session in a pass of its loop that stamped one event), in the same run.
//!
//! ```text
//! cargo run --release -p synq_reflector --example storage_latency -- nats://127.0.0.1:4222,nats://127.0.0.1:4223 [EVENTS]
//! ```

use std::time::{Duration, Instant};

use synq_protocol::crypto::Sealed;
use synq_protocol::ids::{PersistentId, SessionId, ViewId};
use synq_protocol::wire::{EventBody, StampedEvent};
use synq_reflector::storage::{DiskStorage, JetStreamOptions, JetStreamStorage, SessionMeta, Storage};

/// Appends `count` events of 100 bytes one by one; returns each append's duration.
fn measure(storage: &mut dyn Storage, session: &SessionId, count: u32) -> Vec<Duration> {
    let meta = SessionMeta {
        persistent_id: PersistentId([2; 32]),
        tick_ms: 50,
        initial_persisted: None,
        reseeded_from: None,
        initial_persisted_damaged: None,
    };
    storage.create_session(session, &meta).expect("create the session");
    let mut times = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        let payload = Sealed { nonce: [seq as u8; 24], ciphertext: vec![seq as u8; 100] };
        let event = StampedEvent {
            time: u64::from(seq),
            seq,
            body: EventBody::View { sender: ViewId(1), sent: None, payload },
        };
        let start = Instant::now();
        storage.append_events(session, &[event]).expect("append");
        times.push(start.elapsed());
    }
    times
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "{name:<28} appends {:>6}  p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}  mean {:>9.1?}",
        times.len(),
        at(0.50),
        at(0.99),
        times[times.len() - 1],
        mean
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let urls: Vec<String> =
        args.next().expect("usage: storage_latency NATS_URLS [EVENTS]").split(',').map(str::to_string).collect();
    let count: u32 = args.next().map_or(2_000, |n| n.parse().expect("EVENTS is a number"));
    // A fresh session id per run: the cluster may hold earlier runs' sessions.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(&nanos.to_le_bytes());
    let session = SessionId(id);

    let dir = std::env::temp_dir().join(format!("synq-storage-latency-{}", std::process::id()));
    let mut disk = DiskStorage::open(&dir).expect("open the data directory");
    report("DiskStorage (no fsync)", measure(&mut disk, &session, count));
    let start = Instant::now();
    disk.sync().expect("sync");
    println!("DiskStorage sync of the log afterwards: {:.1?}", start.elapsed());
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);

    let mut jetstream = JetStreamStorage::connect(&urls, JetStreamOptions::default()).expect("connect to NATS");
    report("JetStreamStorage", measure(&mut jetstream, &session, count));
}
