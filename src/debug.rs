//! Debug output, like Croquet's `debug:` option: `SYNQ_DEBUG=session,snapshot,persist,messages,
//! sends,hashing` (environment variable) or [`SessionConfig::debug`](crate::SessionConfig::debug).

use std::fmt;

/// Which debug output to log (at `info` level, prefixed `bevy_synq[<topic>]`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DebugFlags(u8);

impl DebugFlags {
    /// Nothing.
    pub const NONE: Self = Self(0);
    /// Session ids, connects and disconnects, and how the model started (fresh, from a snapshot,
    /// from persisted data, or resumed).
    pub const SESSION: Self = Self(1);
    /// Snapshot points (time, size, hash), tallies and uploads.
    pub const SNAPSHOT: Self = Self(2);
    /// Persist requests, uploads (hash and size) and the persisted data handed to init.
    pub const PERSIST: Self = Self(4);
    /// Every external message received (after decryption: sequence, time, kind, size).
    pub const MESSAGES: Self = Self(8);
    /// Every event sent (before encryption: size).
    pub const SENDS: Self = Self(16);
    /// What the model code hash covers, part by part.
    pub const HASHING: Self = Self(32);

    const NAMES: [(&'static str, Self); 6] = [
        ("session", Self::SESSION),
        ("snapshot", Self::SNAPSHOT),
        ("persist", Self::PERSIST),
        ("messages", Self::MESSAGES),
        ("sends", Self::SENDS),
        ("hashing", Self::HASHING),
    ];

    /// Parses a comma-separated list such as `"session,persist"`; `"all"` turns everything on.
    /// Unknown names are returned as the error.
    ///
    /// ```
    /// use bevy_synq::DebugFlags;
    /// let flags = DebugFlags::parse("session, persist").unwrap();
    /// assert!(flags.contains(DebugFlags::PERSIST) && !flags.contains(DebugFlags::SENDS));
    /// assert!(DebugFlags::parse("sesion").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut flags = Self::NONE;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                flags = Self(63);
                continue;
            }
            match Self::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, flag)) => flags = flags | *flag,
                None => {
                    let known: Vec<_> = Self::NAMES.iter().map(|(n, _)| *n).collect();
                    return Err(format!("unknown debug topic {name:?} (known: {}, all)", known.join(", ")));
                }
            }
        }
        Ok(flags)
    }

    /// The flags named in the `SYNQ_DEBUG` environment variable (unknown names are reported and
    /// ignored).
    pub fn from_env() -> Self {
        match std::env::var("SYNQ_DEBUG") {
            Ok(text) => Self::parse(&text).unwrap_or_else(|error| {
                ::tracing::warn!("SYNQ_DEBUG: {error}");
                Self::NONE
            }),
            Err(_) => Self::NONE,
        }
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
}

impl std::ops::BitOr for DebugFlags {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Debug for DebugFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Self::NAMES.iter().filter(|(_, flag)| self.contains(*flag)).map(|(n, _)| *n).collect();
        write!(f, "DebugFlags({})", names.join(","))
    }
}

/// Logs a debug line when the topic is on.
macro_rules! synq_debug {
    ($flags:expr, $topic:ident, $($arg:tt)*) => {
        if $flags.contains($crate::debug::DebugFlags::$topic) {
            ::tracing::info!("bevy_synq[{}] {}", stringify!($topic).to_lowercase(), format!($($arg)*));
        }
    };
}
pub(crate) use synq_debug;
