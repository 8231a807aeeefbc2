//! End-to-end encryption: the session key, sealing and opening payloads, password checks.
//!
//! * The key is Argon2id(password, salt derived from the persistent id), so it stays the same
//!   across code versions and persisted data remains readable.
//! * Every payload is sealed with XChaCha20-Poly1305 under a fresh random 24-byte nonce, with
//!   associated data that binds the ciphertext to its [`SealKind`] and to its session (and, for
//!   events, to the sending view). A reflector can therefore neither read a payload nor move it
//!   to another session, another kind or another sender without the open failing.

use crate::ids::{Hash32, PersistentId, SessionId, ViewId, hash_parts};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

/// What a sealed payload is; bound into its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SealKind {
    /// A view → model event.
    Event = 1,
    /// A model snapshot.
    Snapshot = 2,
    /// A persisted-data document.
    Persisted = 3,
    /// Per-view data delivered with view-join.
    ViewData = 4,
    /// The password check token.
    PasswordCheck = 5,
}

/// What a sealed payload belongs to; bound into its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// A session (snapshots, password checks).
    Session(SessionId),
    /// A session and the view that sent it (events, view data).
    SessionView(SessionId, ViewId),
    /// A persistent id (persisted data, readable by later code versions).
    Persistent(PersistentId),
}

impl Binding {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Binding::Session(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
            Binding::SessionView(id, view) => {
                out.push(2);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&view.0.to_le_bytes());
            }
            Binding::Persistent(id) => {
                out.push(3);
                out.extend_from_slice(id.as_bytes());
            }
        }
    }
}

/// A sealed payload: nonce and ciphertext (with its 16-byte tag).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The random 24-byte XChaCha20 nonce.
    pub nonce: [u8; 24],
    /// Ciphertext followed by the Poly1305 tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// Size of the sealed payload in bytes (nonce, ciphertext and tag).
    pub fn len(&self) -> usize {
        24 + self.ciphertext.len()
    }

    /// Whether the payload holds no bytes at all (never true for a real seal).
    pub fn is_empty(&self) -> bool {
        self.ciphertext.is_empty()
    }
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.len())
    }
}

/// Why a crypto operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The key-derivation parameters are invalid.
    #[error("invalid key derivation parameters: {0}")]
    Params(String),
    /// The password check token does not open with this password.
    #[error("wrong session password")]
    WrongPassword,
    /// The payload does not open: tampered, truncated, or sealed for another key, kind or session.
    #[error("payload does not open with this session key (tampered, or sealed for another session, kind or sender)")]
    Open,
}

/// Argon2id parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Iterations.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// The Argon2 crate's recommended parameters (19 MiB, 2 iterations, 1 lane).
    pub const RECOMMENDED: Self = Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 };

    /// Cheap parameters for tests only: far too weak for real passwords.
    pub const INSECURE_FAST: Self = Self { memory_kib: 64, iterations: 1, parallelism: 1 };
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::RECOMMENDED
    }
}

/// The key of a session, derived from its password. Zeroized on drop.
pub struct SessionKey {
    cipher: XChaCha20Poly1305,
    vote_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// Derives the key with Argon2id from the password and a salt derived from the persistent id.
    pub fn derive(password: &str, persistent_id: &PersistentId, params: KdfParams) -> Result<Self, CryptoError> {
        let argon_params = argon2::Params::new(params.memory_kib, params.iterations, params.parallelism, Some(32))
            .map_err(|e| CryptoError::Params(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
        let salt = hash_parts(&[b"bevy_synq key salt v1", persistent_id.as_bytes()]);
        let mut master = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(password.as_bytes(), &salt, master.as_mut())
            .map_err(|e| CryptoError::Params(e.to_string()))?;
        Ok(Self::from_master(&master))
    }

    /// Builds a key from 32 bytes of key material (already derived).
    pub fn from_master(master: &[u8; 32]) -> Self {
        let seal_key = Zeroizing::new(hash_parts(&[b"bevy_synq seal key v1", master]));
        let vote_key = Zeroizing::new(hash_parts(&[b"bevy_synq vote key v1", master]));
        Self { cipher: XChaCha20Poly1305::new(seal_key.as_ref().into()), vote_key }
    }

    fn aad(kind: SealKind, binding: &Binding) -> Vec<u8> {
        let mut aad = Vec::with_capacity(48);
        aad.extend_from_slice(b"bevy_synq/1");
        aad.push(kind as u8);
        binding.write(&mut aad);
        aad
    }

    /// Seals `plaintext` as a payload of `kind` belonging to `binding`.
    pub fn seal(&self, kind: SealKind, binding: &Binding, plaintext: &[u8]) -> Sealed {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = Self::aad(kind, binding);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        Sealed { nonce: nonce.into(), ciphertext }
    }

    /// Opens a payload sealed with [`SessionKey::seal`] for the same kind and binding.
    pub fn open(&self, kind: SealKind, binding: &Binding, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let aad = Self::aad(kind, binding);
        self.cipher
            .decrypt(XNonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad: &aad })
            .map_err(|_| CryptoError::Open)
    }

    /// The password check token for a session: the session id sealed under this key.
    pub fn password_check(&self, session: &SessionId) -> Sealed {
        self.seal(SealKind::PasswordCheck, &Binding::Session(*session), session.as_bytes())
    }

    /// Checks another client's password check token against this key.
    pub fn verify_password_check(&self, session: &SessionId, token: &Sealed) -> Result<(), CryptoError> {
        match self.open(SealKind::PasswordCheck, &Binding::Session(*session), token) {
            Ok(plain) if plain == session.as_bytes() => Ok(()),
            _ => Err(CryptoError::WrongPassword),
        }
    }

    /// A keyed digest of a state hash: equal states give equal digests, and whoever lacks the key
    /// (the reflector) cannot test guesses of the state against it.
    pub fn vote_digest(&self, state_hash: &Hash32) -> Hash32 {
        hash_parts(&[b"bevy_synq vote v1", self.vote_key.as_ref(), state_hash])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pw: &str) -> SessionKey {
        SessionKey::derive(pw, &PersistentId([7; 32]), KdfParams::INSECURE_FAST).unwrap()
    }

    #[test]
    fn seal_open_round_trip() {
        let k = key("pw");
        let b = Binding::SessionView(SessionId([1; 32]), ViewId(9));
        let s = k.seal(SealKind::Event, &b, b"hello");
        assert_eq!(k.open(SealKind::Event, &b, &s).unwrap(), b"hello");
    }

    #[test]
    fn wrong_kind_session_sender_or_key_fail() {
        let k = key("pw");
        let b = Binding::SessionView(SessionId([1; 32]), ViewId(9));
        let s = k.seal(SealKind::Event, &b, b"hello");
        assert_eq!(k.open(SealKind::Snapshot, &b, &s), Err(CryptoError::Open));
        let other_sender = Binding::SessionView(SessionId([1; 32]), ViewId(10));
        assert_eq!(k.open(SealKind::Event, &other_sender, &s), Err(CryptoError::Open));
        let other_session = Binding::SessionView(SessionId([2; 32]), ViewId(9));
        assert_eq!(k.open(SealKind::Event, &other_session, &s), Err(CryptoError::Open));
        assert_eq!(key("other").open(SealKind::Event, &b, &s), Err(CryptoError::Open));
    }

    #[test]
    fn tampered_and_truncated_fail() {
        let k = key("pw");
        let b = Binding::Session(SessionId([1; 32]));
        let mut s = k.seal(SealKind::Snapshot, &b, b"state");
        s.ciphertext[0] ^= 1;
        assert_eq!(k.open(SealKind::Snapshot, &b, &s), Err(CryptoError::Open));
        let mut t = k.seal(SealKind::Snapshot, &b, b"state");
        t.ciphertext.truncate(3);
        assert_eq!(k.open(SealKind::Snapshot, &b, &t), Err(CryptoError::Open));
        t.ciphertext.clear();
        assert_eq!(k.open(SealKind::Snapshot, &b, &t), Err(CryptoError::Open));
    }

    #[test]
    fn password_check_tells_wrong_password() {
        let session = SessionId([3; 32]);
        let token = key("right").password_check(&session);
        assert!(key("right").verify_password_check(&session, &token).is_ok());
        assert_eq!(key("wrong").verify_password_check(&session, &token), Err(CryptoError::WrongPassword));
    }
}
