//! The model's random numbers: seeded from the session id, state in the snapshot.

use bevy::prelude::*;
use serde::{Deserialize, Serialize};

/// The only source of randomness model code may use.
///
/// A xoshiro256++ generator seeded from the session id; its state is part of every snapshot, so a
/// late joiner continues the very same sequence. Every method is a pure function of that state:
/// floats are built from integer bits, never from platform math.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_synq::prelude::*;
/// fn spawn_asteroid(mut rng: ResMut<ModelRng>) {
///     let x = rng.range_f32(0.0, 1000.0);
///     let clockwise = rng.bool();
///     # let _ = (x, clockwise);
/// }
/// ```
#[derive(Resource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRng {
    s: [u64; 4],
}

impl ModelRng {
    /// A generator seeded from 32 bytes (e.g. a hash of the session id).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (i, word) in s.iter_mut().enumerate() {
            *word = u64::from_le_bytes(seed[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        }
        if s == [0; 4] {
            s[0] = 0x9E37_79B9_7F4A_7C15;
        }
        Self { s }
    }

    /// The next 64 random bits.
    pub fn u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// The next 32 random bits.
    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }

    /// A uniform `f64` in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform `f32` in `[0, 1)`.
    pub fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform `f32` in `[low, high)`.
    pub fn range_f32(&mut self, low: f32, high: f32) -> f32 {
        low + (high - low) * self.f32()
    }

    /// A uniform integer in `[low, high)` (unbiased). Returns `low` when the range is empty.
    pub fn range_u64(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        let span = high - low;
        let zone = u64::MAX - (u64::MAX % span);
        loop {
            let v = self.u64();
            if v < zone {
                return low + v % span;
            }
        }
    }

    /// A uniform index below `len` (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.range_u64(0, len as u64) as usize
    }

    /// A fair coin.
    pub fn bool(&mut self) -> bool {
        self.u64() >> 63 == 1
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_ranges_hold() {
        let mut a = ModelRng::from_seed([7; 32]);
        let mut b = ModelRng::from_seed([7; 32]);
        for _ in 0..1000 {
            assert_eq!(a.u64(), b.u64());
            let f = a.f32();
            assert!((0.0..1.0).contains(&f));
            let r = a.range_u64(3, 9);
            assert!((3..9).contains(&r));
            b.f32();
            b.range_u64(3, 9);
        }
        assert_ne!(ModelRng::from_seed([8; 32]).u64(), ModelRng::from_seed([7; 32]).u64());
    }
}
