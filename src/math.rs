//! Portable math for model code.
//!
//! `+ - * /` and `sqrt` on `f32`/`f64` are exact IEEE operations and agree on every platform. The
//! transcendental functions of `std` (`sin`, `cos`, `atan2`, `exp`, `powf`, …) call the
//! platform's math library and may differ in the last bit between platforms — enough to make
//! replicas diverge. Model code uses these instead: they come from `libm`, a pure-Rust port of
//! musl's math library, and give the same bits everywhere.
//!
//! ```
//! use bevy_synq::math;
//! let (s, c) = (math::sin(0.5), math::cos(0.5));
//! assert!((s * s + c * c - 1.0).abs() < 1e-6);
//! ```

pub use libm::{acosf as acos, asinf as asin, atan2f as atan2, atanf as atan, cosf as cos, expf as exp};
pub use libm::{fmodf as fmod, hypotf as hypot, logf as ln, powf as pow, sinf as sin, tanf as tan};

/// 64-bit versions.
pub mod f64 {
    pub use libm::{acos, asin, atan, atan2, cos, exp, fmod, hypot, log as ln, pow, sin, tan};
}

/// A unit vector at angle `radians` (portable `(cos, sin)`).
pub fn direction(radians: f32) -> (f32, f32) {
    (cos(radians), sin(radians))
}
