//! Session identity: the ids every replica derives the same way, and the hashes they are made of.
//!
//! All hashes are SHA-256 and print as base64url without padding (43 characters), as Croquet's do.

use crate::canonical_json::{CanonicalJsonError, canonicalize, to_canonical_vec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A 32-byte SHA-256 digest.
pub type Hash32 = [u8; 32];

/// SHA-256 of `bytes`, plain (no framing): what Croquet's `hashString` computes.
pub fn sha256(bytes: &[u8]) -> Hash32 {
    Sha256::digest(bytes).into()
}

/// SHA-256 of the concatenation of `parts`, each prefixed with its length so that no two
/// different part lists can collide by moving bytes across a boundary.
pub fn hash_parts(parts: &[&[u8]]) -> Hash32 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Encodes bytes as base64url without padding.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes base64url without padding; `None` on any character outside the alphabet or an
/// impossible length.
pub fn from_base64url(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub Hash32);

        impl $name {
            /// The raw digest.
            pub fn as_bytes(&self) -> &Hash32 {
                &self.0
            }

            /// Parses the 43-character base64url form.
            pub fn parse(text: &str) -> Option<Self> {
                let bytes = from_base64url(text)?;
                Some(Self(bytes.try_into().ok()?))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&base64url(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), base64url(&self.0))
            }
        }
    };
}

hash_id!(
    /// Identifies a session independently of the model code: `H(appId, session name)`.
    ///
    /// Persisted data is stored per persistent id, so it survives code changes.
    PersistentId
);
hash_id!(
    /// Identifies one session: `H(persistentId, model code hash, bevy_synq version, options)`.
    ///
    /// Any change of the model code makes a new session id.
    SessionId
);
hash_id!(
    /// The hash of the model code: its registered types in registration order, and whatever
    /// source text the app feeds in.
    CodeHash
);

/// The longest app id or session name accepted, in characters (as in Croquet).
pub const MAX_NAME_CHARS: usize = 128;

/// Why an app id or session name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The app id is not reverse-DNS style.
    #[error(
        "invalid app id {app_id:?}: {reason}; an app id is reverse-DNS style like \"io.example.game\": \
         at least two dot-separated parts, each starting with an ASCII letter and made of ASCII letters, \
         digits, '_' and '-'"
    )]
    AppId {
        /// The refused text.
        app_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The session name is empty, too long or contains control characters.
    #[error("invalid session name {name:?}: {reason}")]
    SessionName {
        /// The refused text.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A validated app id, reverse-DNS style (`io.example.game`), at most [`MAX_NAME_CHARS`] long.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AppId(String);

impl AppId {
    /// Validates `text` as an app id.
    ///
    /// ```
    /// use synq_protocol::ids::AppId;
    /// assert!(AppId::new("io.example.game").is_ok());
    /// let err = AppId::new("game").unwrap_err().to_string();
    /// assert!(err.contains("at least two dot-separated parts"), "{err}");
    /// ```
    pub fn new(text: &str) -> Result<Self, IdError> {
        let refuse = |reason: String| Err(IdError::AppId { app_id: text.to_owned(), reason });
        let chars = text.chars().count();
        if chars > MAX_NAME_CHARS {
            return refuse(format!("it is {chars} characters long, the limit is {MAX_NAME_CHARS}"));
        }
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() < 2 {
            return refuse("it has no '.'".into());
        }
        for (i, part) in parts.iter().enumerate() {
            let n = i + 1;
            match part.chars().next() {
                None => return refuse(format!("part {n} is empty")),
                Some(c) if !c.is_ascii_alphabetic() => {
                    return refuse(format!("part {n} ({part:?}) does not start with a letter"));
                }
                _ => {}
            }
            if let Some(c) = part.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
                return refuse(format!("part {n} ({part:?}) contains {c:?}"));
            }
        }
        Ok(Self(text.to_owned()))
    }

    /// The app id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated session name: 1 to [`MAX_NAME_CHARS`] characters, no control characters. Hashed
/// byte for byte (no Unicode normalisation).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SessionName(String);

impl SessionName {
    /// Validates `text` as a session name.
    pub fn new(text: &str) -> Result<Self, IdError> {
        let refuse = |reason: String| Err(IdError::SessionName { name: text.to_owned(), reason });
        let chars = text.chars().count();
        if chars == 0 {
            return refuse("it is empty".into());
        }
        if chars > MAX_NAME_CHARS {
            return refuse(format!("it is {chars} characters long, the limit is {MAX_NAME_CHARS}"));
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return refuse(format!("it contains the control character {c:?}"));
        }
        Ok(Self(text.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Options hashed into an id, held as canonical JSON. The default is no options (`{}`).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdOptions(Vec<u8>);

impl IdOptions {
    /// No options: the canonical JSON `{}`.
    pub fn none() -> Self {
        Self(b"{}".to_vec())
    }

    /// The canonical JSON of `options` (usually a struct or a map).
    pub fn from_serialize<T: Serialize + ?Sized>(options: &T) -> Result<Self, CanonicalJsonError> {
        to_canonical_vec(options).map(Self)
    }

    /// Canonicalizes JSON text.
    pub fn from_json(json: &[u8]) -> Result<Self, CanonicalJsonError> {
        canonicalize(json).map(Self)
    }

    /// The canonical JSON bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Default for IdOptions {
    fn default() -> Self {
        Self::none()
    }
}

impl PersistentId {
    /// `H(appId, session name, persistent options)`: the same for every code version, so that
    /// persisted data outlives code changes.
    pub fn derive(app_id: &AppId, name: &SessionName, persistent_options: &IdOptions) -> Self {
        Self(hash_parts(&[
            b"bevy_synq persistentId v1",
            app_id.as_str().as_bytes(),
            name.as_str().as_bytes(),
            persistent_options.as_bytes(),
        ]))
    }
}

impl SessionId {
    /// `H(persistentId, model code hash, library version, session options)`: any change of the
    /// model code (or of bevy_synq, which passes its `CARGO_PKG_VERSION` as `library_version`)
    /// makes a new session.
    pub fn derive(
        persistent_id: &PersistentId,
        code_hash: &CodeHash,
        library_version: &str,
        session_options: &IdOptions,
    ) -> Self {
        Self(hash_parts(&[
            b"bevy_synq sessionId v1",
            persistent_id.as_bytes(),
            code_hash.as_bytes(),
            library_version.as_bytes(),
            session_options.as_bytes(),
        ]))
    }
}

/// A client's view of a session. Random per client process, kept across reconnects, and handed to
/// the model in `view-join` / `view-exit` events.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ViewId(pub u64);

impl fmt::Display for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ViewId({:016x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_every_length() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64url(&bytes);
            assert!(!text.contains('='));
            assert_eq!(from_base64url(&text).unwrap(), bytes, "length {len}");
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn base64url_rejects_garbage() {
        assert!(from_base64url("ab=c").is_none());
        assert!(from_base64url("a").is_none());
        assert!(SessionId::parse("short").is_none());
    }

    #[test]
    fn hash_parts_is_boundary_safe() {
        assert_ne!(hash_parts(&[b"ab", b"c"]), hash_parts(&[b"a", b"bc"]));
    }

    #[test]
    fn app_ids_are_validated_with_clear_errors() {
        for good in ["io.example.game", "com.my-company.app_2", "a.b"] {
            assert!(AppId::new(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("game", "no '.'"),
            ("", "no '.'"),
            ("io..game", "part 2 is empty"),
            ("io.example.", "part 3 is empty"),
            ("io.2d.game", "does not start with a letter"),
            ("io.ex ample", "contains ' '"),
            ("io.exämple", "contains 'ä'"),
        ] {
            let err = AppId::new(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("io.example.game"), "{bad}: {err}");
        }
        let long = format!("io.{}", "a".repeat(126));
        assert!(AppId::new(&long[..128]).is_ok());
        assert!(AppId::new(&long).unwrap_err().to_string().contains("129 characters"));
    }

    #[test]
    fn session_names_are_limited() {
        assert!(SessionName::new("lobby 1 — ünïcödé 😀").is_ok());
        assert!(SessionName::new(&"é".repeat(128)).is_ok());
        assert!(SessionName::new(&"é".repeat(129)).unwrap_err().to_string().contains("limit is 128"));
        assert!(SessionName::new("").unwrap_err().to_string().contains("empty"));
        assert!(SessionName::new("a\nb").unwrap_err().to_string().contains("control character"));
    }

    #[test]
    fn persistent_id_ignores_code_and_session_id_does_not() {
        let app = AppId::new("io.example.game").unwrap();
        let name = SessionName::new("lobby").unwrap();
        let pid = PersistentId::derive(&app, &name, &IdOptions::none());
        let code_a = CodeHash([1; 32]);
        let code_b = CodeHash([2; 32]);
        let none = IdOptions::none();
        let sid = |code: &CodeHash, version: &str, opts: &IdOptions| SessionId::derive(&pid, code, version, opts);
        assert_ne!(sid(&code_a, "0.1.0", &none), sid(&code_b, "0.1.0", &none));
        assert_ne!(sid(&code_a, "0.1.0", &none), sid(&code_a, "0.1.1", &none));
        let opts = IdOptions::from_json(br#"{"level": 2}"#).unwrap();
        assert_ne!(sid(&code_a, "0.1.0", &none), sid(&code_a, "0.1.0", &opts));
        assert_eq!(IdOptions::from_json(br#"{ "level" : 2.0 }"#).unwrap(), opts);
        let other_name = SessionName::new("lobby2").unwrap();
        assert_ne!(pid, PersistentId::derive(&app, &other_name, &IdOptions::none()));
        assert_ne!(pid, PersistentId::derive(&app, &name, &opts));
    }

    /// Our SHA-256, base64url and canonical JSON reproduce Croquet's published ids
    /// (reference §5.7: appId `io.example.msqtest`, name `test1`, no options).
    #[test]
    fn primitives_reproduce_croquet_vectors() {
        let options = crate::canonical_json::to_canonical_string(&serde_json::json!({})).unwrap();
        let persistent = base64url(&sha256(format!("io.example.msqtest/test1{options}").as_bytes()));
        assert_eq!(persistent, "d97_a-757Va3QbpN0d56uo2ODBG7TMaDtUJj34lCoXA");
        let code = "IygGWlgRtFKD7Z0Y1U4inZ-CVmW9kNlTkme1vlMQt6A";
        let session = base64url(&sha256(format!("{persistent}|unknown_dev_id{options}{code}").as_bytes()));
        assert_eq!(session, "BjxQLl-_EaOXljeeouNb4QnjoR9aJfQX5Dy-u1H3mCI");
    }
}
