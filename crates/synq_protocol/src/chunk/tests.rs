use super::*;
use proptest::prelude::*;

fn reassembler(max_bytes: usize) -> Reassembler {
    Reassembler::new(&Limits { max_chunks: 16, ..Limits::default() }, max_bytes)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

#[test]
fn split_shapes() {
    let chunks = split(7, &payload(10), 4);
    assert_eq!(chunks.iter().map(|c| c.data.len()).collect::<Vec<_>>(), [4, 4, 2]);
    assert!(chunks.iter().all(|c| c.count == 3 && c.total_len == 10 && c.payload_id == 7));
    let empty = split(1, &[], 4);
    assert_eq!(empty.len(), 1);
    assert!(empty[0].data.is_empty());
    assert_eq!(split(1, &payload(3), 0).len(), 3, "max_chunk 0 is treated as 1");
    assert_eq!(format!("{:?}", chunks[2]), "Chunk(payload 7 #2/3, 2 of 10 bytes)");
}

#[test]
fn reassembles_in_any_order() {
    let data = payload(1000);
    let mut chunks = split(3, &data, 100);
    chunks.reverse();
    chunks.swap(2, 7);
    let mut r = reassembler(1 << 20);
    let mut done = None;
    for c in chunks {
        assert!(done.is_none());
        done = r.push(c).unwrap();
    }
    assert_eq!(done.unwrap(), data);
    assert_eq!((r.in_flight(), r.in_flight_bytes()), (0, 0));
}

#[test]
fn interleaved_payloads() {
    let (a, b) = (payload(50), payload(70));
    let mut r = reassembler(1000);
    let (ca, cb) = (split(1, &a, 20), split(2, &b, 20));
    let mut out = Vec::new();
    for pair in ca.iter().zip(cb.iter()) {
        out.extend(r.push(pair.0.clone()).unwrap());
        out.extend(r.push(pair.1.clone()).unwrap());
    }
    out.extend(r.push(cb[3].clone()).unwrap());
    assert_eq!(out, vec![a, b]);
}

#[test]
fn duplicate_is_refused_and_drops_the_payload() {
    let chunks = split(5, &payload(30), 10);
    let mut r = reassembler(100);
    r.push(chunks[0].clone()).unwrap();
    assert_eq!(r.push(chunks[0].clone()), Err(ChunkError::Duplicate { payload_id: 5, index: 0 }));
    assert_eq!((r.in_flight(), r.in_flight_bytes()), (0, 0));
}

#[test]
fn out_of_range_and_bad_counts() {
    let mut r = reassembler(100);
    let mut c = split(1, &payload(30), 10)[0].clone();
    c.index = 3;
    assert!(matches!(r.push(c.clone()), Err(ChunkError::OutOfRange { .. })));
    c.index = 0;
    c.count = 0;
    assert!(matches!(r.push(c.clone()), Err(ChunkError::ChunkCount { .. })));
    c.count = 17;
    assert!(matches!(r.push(c), Err(ChunkError::ChunkCount { limit: 16, .. })));
}

#[test]
fn oversized_and_over_budget() {
    let mut r = reassembler(100);
    let big = split(1, &payload(101), 10);
    assert!(matches!(r.push(big[0].clone()), Err(ChunkError::TooLarge { .. })));
    let mut lie = split(2, &payload(10), 5)[0].clone();
    lie.total_len = u64::MAX;
    assert!(matches!(r.push(lie), Err(ChunkError::TooLarge { .. })));
    // 60 + 60 bytes in flight exceed 100 although each payload fits.
    r.push(split(3, &payload(60), 10)[0].clone()).unwrap();
    let err = r.push(split(4, &payload(60), 10)[0].clone()).unwrap_err();
    assert!(matches!(err, ChunkError::OverBudget { .. }), "{err}");
    assert_eq!(r.in_flight_bytes(), 60);
    r.abort(3);
    assert_eq!(r.in_flight_bytes(), 0);
}

#[test]
fn too_many_payloads_in_flight() {
    let mut r = Reassembler::new(&Limits::default(), 1 << 20);
    for id in 0..MAX_IN_FLIGHT as u32 {
        r.push(split(id, &payload(4), 2)[0].clone()).unwrap();
    }
    let err = r.push(split(999, &payload(4), 2)[0].clone()).unwrap_err();
    assert!(matches!(err, ChunkError::OverBudget { .. }));
}

#[test]
fn inconsistent_chunks() {
    let chunks = split(9, &payload(25), 10);
    let check = |first: Chunk, second: Chunk| {
        let mut r = reassembler(100);
        let _ = r.push(first);
        let err = r.push(second).unwrap_err();
        assert!(matches!(err, ChunkError::Inconsistent { .. }), "{err}");
    };
    // Another total length or count for the same payload.
    let mut other_len = chunks[1].clone();
    other_len.total_len = 26;
    check(chunks[0].clone(), other_len);
    // A middle chunk of another size than the first.
    let mut short = chunks[1].clone();
    short.data.pop();
    check(chunks[0].clone(), short);
    // A last chunk that is too long.
    let mut long_last = chunks[2].clone();
    long_last.data.extend([0; 6]);
    check(chunks[0].clone(), long_last);
    // Lone chunks whose geometry is impossible.
    let mut r = reassembler(100);
    let mut huge_first = chunks[0].clone();
    huge_first.data = vec![0; 20];
    assert!(matches!(r.push(huge_first), Err(ChunkError::Inconsistent { .. })));
    let mut odd_last = chunks[2].clone();
    odd_last.data = vec![0; 4];
    assert!(matches!(r.push(odd_last), Err(ChunkError::Inconsistent { .. })));
    let mut single = split(1, &payload(5), 10)[0].clone();
    single.data.pop();
    assert!(matches!(r.push(single), Err(ChunkError::Inconsistent { .. })));
    let mut many = chunks[0].clone();
    many.count = 16;
    many.total_len = 3;
    assert!(matches!(r.push(many), Err(ChunkError::Inconsistent { .. })));
    assert_eq!((r.in_flight(), r.in_flight_bytes()), (0, 0));
}

fn chunk_strategy() -> impl Strategy<Value = Chunk> {
    (0u32..4, 0u32..20, 0u32..20, 0u64..300, prop::collection::vec(any::<u8>(), 0..120))
        .prop_map(|(payload_id, index, count, total_len, data)| Chunk { payload_id, index, count, total_len, data })
}

proptest! {
    #[test]
    fn split_then_reassemble(len in 0usize..5000, max_chunk in 1usize..700, seed in any::<u64>()) {
        let data = payload(len);
        let mut chunks = split(seed as u32, &data, max_chunk);
        let n = chunks.len();
        chunks.rotate_left(seed as usize % n);
        let mut r = Reassembler::new(&Limits::default(), 5000);
        let results: Vec<_> = chunks.into_iter().map(|c| r.push(c).unwrap()).collect();
        prop_assert!(results[..n - 1].iter().all(Option::is_none));
        prop_assert_eq!(results[n - 1].as_ref(), Some(&data));
    }

    /// Random chunks never panic, and the reassembler never holds more than its budget.
    #[test]
    fn random_chunks_stay_bounded(chunks in prop::collection::vec(chunk_strategy(), 0..60)) {
        let mut r = reassembler(500);
        for c in chunks {
            if let Ok(Some(done)) = r.push(c) {
                prop_assert!(done.len() <= 500);
            }
            prop_assert!(r.in_flight_bytes() <= 500);
        }
    }
}
