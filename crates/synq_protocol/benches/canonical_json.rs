//! Canonical JSON encoding against `serde_json::to_vec` of the same value.
//!
//! `save_game` is a persisted-data document of 1000 entities (structs, floats, a HashMap per
//! entity); `hashmap_10k` is one HashMap of 10 000 string keys, whose arrival order is random, so
//! canonical JSON must sort it (serde_json writes it unsorted).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::Serialize;
use std::collections::HashMap;
use std::hint::black_box;
use synq_protocol::canonical_json::to_canonical_vec;

#[derive(Serialize)]
struct Entity {
    id: u64,
    name: String,
    position: [f32; 2],
    velocity: [f64; 2],
    health: f64,
    tags: Vec<String>,
    stats: HashMap<String, i64>,
    alive: bool,
}

#[derive(Serialize)]
struct SaveGame {
    version: u32,
    seed: u64,
    entities: Vec<Entity>,
}

fn save_game() -> SaveGame {
    let entities = (0..1000u64)
        .map(|i| Entity {
            id: i,
            name: format!("ship-{i}"),
            position: [i as f32 * 0.37, -(i as f32) * 1.25],
            velocity: [(i as f64).sin(), (i as f64 * 0.1).cos() * 3.0],
            health: 100.0 - (i % 17) as f64 * 2.5,
            tags: vec!["enemy".into(), format!("wave{}", i % 5)],
            stats: (0..4).map(|k| (format!("stat{k}"), (i * k) as i64)).collect(),
            alive: i % 3 != 0,
        })
        .collect();
    SaveGame { version: 1, seed: 42, entities }
}

fn compare<T: Serialize>(c: &mut Criterion, name: &str, value: &T) {
    let mut group = c.benchmark_group(format!("json/{name}"));
    group.throughput(Throughput::Bytes(to_canonical_vec(value).unwrap().len() as u64));
    group.bench_function("serde_json_to_vec", |b| b.iter(|| serde_json::to_vec(black_box(value)).unwrap()));
    group.bench_function("to_canonical_vec", |b| b.iter(|| to_canonical_vec(black_box(value)).unwrap()));
    group.finish();
}

fn bench(c: &mut Criterion) {
    compare(c, "save_game", &save_game());
    let map: HashMap<String, u64> = (0..10_000u64).map(|i| (format!("key{i}"), i * 7)).collect();
    compare(c, "hashmap_10k", &map);
}

criterion_group!(benches, bench);
criterion_main!(benches);
