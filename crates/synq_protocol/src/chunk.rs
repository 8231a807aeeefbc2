//! Splitting payloads that are larger than one transport message, and putting them together
//! again within fixed bounds.
//!
//! [`split`] cuts a payload into [`Chunk`]s of `max_chunk` bytes (the last one shorter). Every
//! chunk repeats the payload's id, chunk count and total length, so the [`Reassembler`] can check
//! each one on arrival, in any order. It refuses — with a [`ChunkError`], never a panic — chunk
//! counts above [`Limits::max_chunks`], payloads above its byte limit, more in-flight bytes than
//! that limit, and chunks that are out of range, duplicated, of the wrong length, or that
//! contradict the earlier chunks of their payload. A refused payload is dropped; others in flight
//! are unaffected.
//!
//! The codec sends chunks as their own frames (see [`crate::codec::split_frame`]).

use crate::limits::Limits;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How many payloads a [`Reassembler`] holds partially at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// One piece of a payload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Identifies the payload among those in flight on one connection.
    pub payload_id: u32,
    /// Position of this chunk, `0..count`.
    pub index: u32,
    /// Number of chunks of the payload (at least 1).
    pub count: u32,
    /// Length of the whole payload in bytes.
    pub total_len: u64,
    /// This chunk's bytes: `max_chunk` bytes, except for the last chunk.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Chunk(payload {} #{}/{}, {} of {} bytes)",
            self.payload_id,
            self.index,
            self.count,
            self.data.len(),
            self.total_len
        )
    }
}

/// Splits `bytes` into chunks of at most `max_chunk` bytes (an empty payload gives one empty
/// chunk).
///
/// `max_chunk` is raised to 1 if it is 0, and to `bytes.len() / u32::MAX` (rounded up) if the
/// chunk count would not fit a `u32`. The receiver refuses more than [`Limits::max_chunks`]
/// chunks, so pick `max_chunk ≥ bytes.len() / max_chunks`.
pub fn split(payload_id: u32, bytes: &[u8], max_chunk: usize) -> Vec<Chunk> {
    let max_chunk = max_chunk.max(1).max(bytes.len().div_ceil(u32::MAX as usize));
    let total_len = bytes.len() as u64;
    if bytes.is_empty() {
        return vec![Chunk { payload_id, index: 0, count: 1, total_len, data: Vec::new() }];
    }
    let count = bytes.len().div_ceil(max_chunk) as u32;
    bytes
        .chunks(max_chunk)
        .enumerate()
        .map(|(i, data)| Chunk { payload_id, index: i as u32, count, total_len, data: data.to_vec() })
        .collect()
}

/// Why a chunk was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk count is 0 or above the limit.
    #[error("payload {payload_id}: {count} chunks is not within 1..={limit}")]
    ChunkCount {
        /// The payload.
        payload_id: u32,
        /// Its claimed chunk count.
        count: u32,
        /// [`Limits::max_chunks`].
        limit: u32,
    },
    /// The payload is larger than the byte limit.
    #[error("payload {payload_id}: {total_len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The payload.
        payload_id: u32,
        /// Its claimed length.
        total_len: u64,
        /// The byte limit.
        limit: usize,
    },
    /// Accepting the payload would hold more bytes or payloads in flight than allowed.
    #[error("payload {payload_id}: {reason}")]
    OverBudget {
        /// The payload.
        payload_id: u32,
        /// Which budget.
        reason: String,
    },
    /// The chunk index is not below the chunk count.
    #[error("payload {payload_id}: chunk index {index} is out of range (count {count})")]
    OutOfRange {
        /// The payload.
        payload_id: u32,
        /// The index.
        index: u32,
        /// The count.
        count: u32,
    },
    /// The chunk was already received.
    #[error("payload {payload_id}: chunk {index} arrived twice")]
    Duplicate {
        /// The payload.
        payload_id: u32,
        /// The index.
        index: u32,
    },
    /// The chunk contradicts its payload's other chunks, or its length is impossible.
    #[error("payload {payload_id}: inconsistent chunk {index}: {reason}")]
    Inconsistent {
        /// The payload.
        payload_id: u32,
        /// The index.
        index: u32,
        /// What does not fit.
        reason: String,
    },
}

/// A payload being put together.
struct Partial {
    count: u32,
    total_len: usize,
    /// Length of every chunk but the last; known once one chunk has arrived.
    chunk_len: usize,
    received: Vec<bool>,
    missing: u32,
    buf: Vec<u8>,
}

/// Puts chunked payloads together, within a chunk-count and a byte limit.
#[derive(Default)]
pub struct Reassembler {
    max_chunks: u32,
    max_bytes: usize,
    in_flight_bytes: usize,
    partial: BTreeMap<u32, Partial>,
}

impl fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reassembler({} payloads, {} bytes in flight)", self.partial.len(), self.in_flight_bytes)
    }
}

impl Reassembler {
    /// A reassembler that accepts at most `limits.max_chunks` chunks per payload and holds at most
    /// `max_bytes` bytes across all payloads in flight (so no payload is larger than that).
    pub fn new(limits: &Limits, max_bytes: usize) -> Self {
        Self { max_chunks: limits.max_chunks, max_bytes, in_flight_bytes: 0, partial: BTreeMap::new() }
    }

    /// Bytes reserved by the payloads in flight.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Number of payloads partially received.
    pub fn in_flight(&self) -> usize {
        self.partial.len()
    }

    /// Forgets a partially received payload (e.g. the sender gave up on it).
    pub fn abort(&mut self, payload_id: u32) {
        if let Some(p) = self.partial.remove(&payload_id) {
            self.in_flight_bytes -= p.total_len;
        }
    }

    /// Adds a chunk; returns the whole payload when this chunk completes it.
    ///
    /// On error the chunk's payload is dropped (its other chunks will then be refused or start
    /// it over); the other payloads in flight are kept.
    pub fn push(&mut self, chunk: Chunk) -> Result<Option<Vec<u8>>, ChunkError> {
        let payload_id = chunk.payload_id;
        let result = self.accept(chunk);
        if result.is_err() {
            self.abort(payload_id);
        }
        result
    }

    fn accept(&mut self, chunk: Chunk) -> Result<Option<Vec<u8>>, ChunkError> {
        let Chunk { payload_id, index, count, total_len, data } = chunk;
        let inconsistent = |reason: String| ChunkError::Inconsistent { payload_id, index, reason };
        if count == 0 || count > self.max_chunks {
            return Err(ChunkError::ChunkCount { payload_id, count, limit: self.max_chunks });
        }
        if index >= count {
            return Err(ChunkError::OutOfRange { payload_id, index, count });
        }
        let total = match usize::try_from(total_len) {
            Ok(total) if total <= self.max_bytes => total,
            _ => return Err(ChunkError::TooLarge { payload_id, total_len, limit: self.max_bytes }),
        };
        // Each chunk but the last holds chunk_len ≥ 1 bytes and the last 1..=chunk_len bytes.
        if (count as usize) > total.max(1) {
            return Err(inconsistent(format!("{count} chunks for {total} bytes")));
        }
        if count == 1 {
            if data.len() != total {
                return Err(inconsistent(format!("{} bytes in a single chunk of a {total}-byte payload", data.len())));
            }
            if self.partial.contains_key(&payload_id) {
                return Err(inconsistent("a single-chunk payload reuses the id of one in flight".into()));
            }
            return Ok(Some(data));
        }
        let is_last = index == count - 1;
        if !self.partial.contains_key(&payload_id) {
            if self.partial.len() >= MAX_IN_FLIGHT {
                let reason = format!("{MAX_IN_FLIGHT} payloads already in flight");
                return Err(ChunkError::OverBudget { payload_id, reason });
            }
            if self.in_flight_bytes + total > self.max_bytes {
                let reason = format!(
                    "{} bytes already in flight, {total} more would exceed the limit of {} bytes",
                    self.in_flight_bytes, self.max_bytes
                );
                return Err(ChunkError::OverBudget { payload_id, reason });
            }
            let chunk_len = if is_last {
                let rest = total.checked_sub(data.len()).ok_or_else(|| inconsistent("last chunk too long".into()))?;
                if rest % (count as usize - 1) != 0 {
                    return Err(inconsistent(format!("last chunk of {} bytes does not fit", data.len())));
                }
                rest / (count as usize - 1)
            } else {
                data.len()
            };
            let n = count as usize;
            let fits = chunk_len >= 1
                && (n - 1).checked_mul(chunk_len).is_some_and(|before_last| before_last < total)
                && n.checked_mul(chunk_len).is_none_or(|all| total <= all);
            if !fits {
                return Err(inconsistent(format!("{n} chunks of {chunk_len} bytes cannot make {total} bytes")));
            }
            self.in_flight_bytes += total;
            let partial = Partial {
                count,
                total_len: total,
                chunk_len,
                received: vec![false; count as usize],
                missing: count,
                buf: vec![0; total],
            };
            self.partial.insert(payload_id, partial);
        }
        let Some(p) = self.partial.get_mut(&payload_id) else {
            return Err(inconsistent("payload vanished".into()));
        };
        if p.count != count || p.total_len != total {
            return Err(inconsistent(format!(
                "claims {count} chunks / {total} bytes, earlier chunks said {} / {}",
                p.count, p.total_len
            )));
        }
        if p.received[index as usize] {
            return Err(ChunkError::Duplicate { payload_id, index });
        }
        let start = p.chunk_len.saturating_mul(index as usize);
        let expected = if is_last { total.saturating_sub(start) } else { p.chunk_len };
        let valid = start < total && expected <= p.chunk_len && start + expected <= total;
        if !valid || data.len() != expected {
            return Err(inconsistent(format!("{} bytes where {expected} were expected", data.len())));
        }
        p.buf[start..start + expected].copy_from_slice(&data);
        p.received[index as usize] = true;
        p.missing -= 1;
        if p.missing > 0 {
            return Ok(None);
        }
        let done = self.partial.remove(&payload_id).map(|p| p.buf).unwrap_or_default();
        self.in_flight_bytes -= total;
        Ok(Some(done))
    }
}

#[cfg(test)]
mod tests;
