//! Feeds arbitrary bytes to every decoder of synq_protocol: none may panic, and whatever decodes
//! must re-encode to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synq_protocol::codec::{self, Defragmenter};
use synq_protocol::{Limits, canonical_json, link::JoinLink};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame_bytes: 1 << 20, max_chunks: 64, ..Limits::default() };
    if let Ok(message) = codec::decode_client(data, &limits) {
        assert_eq!(codec::decode_client(&codec::encode_client(&message), &limits).as_ref(), Ok(&message));
    }
    if let Ok(message) = codec::decode_server(data, &limits) {
        assert_eq!(codec::decode_server(&codec::encode_server(&message), &limits).as_ref(), Ok(&message));
    }
    if let Ok(chunk) = codec::decode_chunk(data, &limits) {
        assert_eq!(codec::decode_chunk(&codec::encode_chunk(&chunk), &limits).as_ref(), Ok(&chunk));
    }
    // The input as a stream of transport messages, each prefixed by a one-byte length.
    let mut defrag = Defragmenter::new(&limits);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (message, tail) = tail.split_at((len as usize).min(tail.len()));
        if let Ok(Some(frame)) = defrag.push(message) {
            let _ = codec::decode_client(&frame, &limits);
        }
        assert!(defrag.in_flight_bytes() <= limits.max_frame_bytes);
        rest = tail;
    }
    if let Ok(canonical) = canonical_json::canonicalize(data) {
        assert_eq!(canonical_json::canonicalize(&canonical).as_ref(), Ok(&canonical));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(link) = JoinLink::parse(text) {
            assert_eq!(JoinLink::parse(&link.to_string()).as_ref(), Ok(&link));
        }
    }
});
