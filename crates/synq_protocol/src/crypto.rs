//! End-to-end encryption: the session key, sealing and opening payloads, membership signatures.
//!
//! * The key is Argon2id(password, salt derived from the persistent id), so it stays the same
//!   across code versions and persisted data remains readable.
//! * Every payload is sealed with XChaCha20-Poly1305 under a unique 24-byte nonce (16 bytes drawn
//!   from the OS once per [`SessionKey`], then a 64-bit counter: unique without a system call
//!   per seal; two keys picking the same 128-bit prefix is a 2⁻⁶⁴ event even among 2³² keys), with
//!   associated data that binds the ciphertext to its [`SealKind`] and to its session (and, for
//!   events, to the sending view). A reflector can therefore neither read a payload nor move it
//!   to another session, another kind or another sender without the open failing.
//! * The key also holds an Ed25519 signing key pair (see [`crate::membership`]) with which a
//!   client proves to the reflector that it holds the password, without revealing the key.

use crate::ids::{Hash32, PersistentId, SessionId, ViewId, hash_parts};
use crate::membership::{MemberKey, MemberSignature};
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::{ZeroizeOnDrop, Zeroizing};

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
}

/// What a sealed payload belongs to; bound into its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// A session (snapshots).
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
    /// The 24-byte XChaCha20 nonce (never reused under one key).
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
    /// The session password is empty (as in Croquet, a password is required).
    #[error("the session password must not be empty")]
    EmptyPassword,
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

/// The key of a session, derived from its password.
///
/// Zeroized on drop: the cipher wipes its key in its own `Drop` (chacha20poly1305 0.10 does so
/// unconditionally), the vote key is [`Zeroizing`], and the intermediate master and seal keys and
/// Argon2's working memory (the `zeroize` feature of argon2) are wiped as soon as they are used.
/// A test checks the memory of a dropped key.
pub struct SessionKey {
    cipher: XChaCha20Poly1305,
    vote_key: Zeroizing<[u8; 32]>,
    /// Random per key: the first 16 bytes of every nonce (public, it travels with each seal).
    nonce_prefix: [u8; 16],
    /// The last 8 bytes of the next nonce.
    nonce_counter: AtomicU64,
    /// The membership signing key (boxed: it is large, and wiped in place on drop).
    member: Box<ed25519_dalek::SigningKey>,
}

// Both fields wipe themselves on drop; this fails to compile if that ever stops being true.
const _: () = {
    const fn wipes<T: ZeroizeOnDrop>() {}
    wipes::<XChaCha20Poly1305>();
    wipes::<Zeroizing<[u8; 32]>>();
    wipes::<ed25519_dalek::SigningKey>();
};

impl ZeroizeOnDrop for SessionKey {}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// Derives the key with Argon2id from the password and a salt derived from the persistent id.
    pub fn derive(password: &str, persistent_id: &PersistentId, params: KdfParams) -> Result<Self, CryptoError> {
        if password.is_empty() {
            return Err(CryptoError::EmptyPassword);
        }
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
        let mut nonce_prefix = [0u8; 16];
        OsRng.fill_bytes(&mut nonce_prefix);
        // HKDF-SHA-256 with the member domain tag: the signing key reveals nothing of the others.
        let mut seed = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(Some(b"bevy_synq member key v1"), master)
            .expand(b"ed25519 seed", seed.as_mut())
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        Self {
            cipher: XChaCha20Poly1305::new(seal_key.as_ref().into()),
            vote_key,
            nonce_prefix,
            nonce_counter: AtomicU64::new(0),
            member: Box::new(ed25519_dalek::SigningKey::from_bytes(&seed)),
        }
    }

    /// The public half of this key's membership key pair: the same for every holder of the
    /// password of the persistent id, pinned by the reflector.
    pub fn member_key(&self) -> MemberKey {
        MemberKey(self.member.verifying_key().to_bytes())
    }

    /// Signs `message` with the membership key (see [`crate::membership`] for what is signed).
    pub fn sign_member(&self, message: &[u8]) -> MemberSignature {
        use ed25519_dalek::Signer;
        MemberSignature::from_bytes(&self.member.sign(message).to_bytes())
    }

    fn next_nonce(&self) -> XNonce {
        let count = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(&self.nonce_prefix);
        nonce[16..].copy_from_slice(&count.to_le_bytes());
        nonce.into()
    }

    fn aad(kind: SealKind, binding: &Binding) -> Vec<u8> {
        let mut aad = Vec::with_capacity(48);
        aad.extend_from_slice(b"bevy_synq/1");
        aad.push(kind as u8);
        binding.write(&mut aad);
        aad
    }

    /// Seals `plaintext` as a payload of `kind` belonging to `binding`.
    ///
    /// # Panics
    ///
    /// Only if `plaintext` is longer than XChaCha20's 256 GiB keystream, far beyond any limit.
    pub fn seal(&self, kind: SealKind, binding: &Binding, plaintext: &[u8]) -> Sealed {
        let nonce = self.next_nonce();
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
    fn tampered_nonce_or_tag_fails_and_bindings_are_distinct() {
        let k = key("pw");
        let id = [5; 32];
        let b = Binding::Session(SessionId(id));
        let s = k.seal(SealKind::Persisted, &b, b"doc");
        let mut n = s.clone();
        n.nonce[23] ^= 0x80;
        assert_eq!(k.open(SealKind::Persisted, &b, &n), Err(CryptoError::Open));
        let mut t = s.clone();
        *t.ciphertext.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(SealKind::Persisted, &b, &t), Err(CryptoError::Open));
        let mut extended = s.clone();
        extended.ciphertext.push(0);
        assert_eq!(k.open(SealKind::Persisted, &b, &extended), Err(CryptoError::Open));
        // The same 32 bytes as a persistent id instead of a session id do not open it.
        assert_eq!(k.open(SealKind::Persisted, &Binding::Persistent(PersistentId(id)), &s), Err(CryptoError::Open));
        // Another persistent id (a key derived with another salt) does not open it either.
        let other = SessionKey::derive("pw", &PersistentId([8; 32]), KdfParams::INSECURE_FAST).unwrap();
        assert_eq!(other.open(SealKind::Persisted, &b, &s), Err(CryptoError::Open));
        assert_eq!(k.open(SealKind::Persisted, &b, &s).unwrap(), b"doc");
    }

    #[test]
    fn random_sealed_values_never_panic() {
        let k = key("pw");
        let b = Binding::Session(SessionId([1; 32]));
        for len in 0..64usize {
            let s = Sealed { nonce: [len as u8; 24], ciphertext: (0..len).map(|i| i as u8).collect() };
            assert_eq!(k.open(SealKind::Snapshot, &b, &s), Err(CryptoError::Open));
        }
    }

    #[test]
    fn bad_kdf_params_are_an_error() {
        let bad = KdfParams { memory_kib: 0, iterations: 0, parallelism: 0 };
        assert!(matches!(SessionKey::derive("pw", &PersistentId([0; 32]), bad), Err(CryptoError::Params(_))));
    }

    /// Drops a key in place and checks that its memory no longer holds the key bytes.
    #[test]
    fn key_memory_is_wiped_on_drop() {
        use std::mem::{MaybeUninit, size_of};
        let master = [0x42u8; 32];
        let seal_key = hash_parts(&[b"bevy_synq seal key v1", &master]);
        let vote_key = hash_parts(&[b"bevy_synq vote key v1", &master]);
        assert_eq!(size_of::<SessionKey>(), 96, "layout changed: review the SAFETY comment below");
        let mut slot = MaybeUninit::new(SessionKey::from_master(&master));
        let bytes = |slot: &MaybeUninit<SessionKey>| -> Vec<u8> {
            // SAFETY: reads the slot's own bytes; SessionKey holds byte arrays, one AtomicU64 and
            // one Box (96 bytes, alignment 8, so no padding that could be uninitialised).
            unsafe { std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), size_of::<SessionKey>()).to_vec() }
        };
        let find = |hay: &[u8], needle: &[u8; 32]| hay.windows(32).position(|w| w == needle);
        let before = bytes(&slot);
        let (Some(seal_at), Some(vote_at)) = (find(&before, &seal_key), find(&before, &vote_key)) else {
            panic!("key layout changed: the key bytes are not inline");
        };
        // SAFETY: the slot was initialised above and is not used as a SessionKey afterwards.
        unsafe { slot.assume_init_drop() };
        let after = bytes(&slot);
        assert_eq!(after[seal_at..seal_at + 32], [0; 32], "seal key left in memory");
        assert_eq!(after[vote_at..vote_at + 32], [0; 32], "vote key left in memory");
    }

    #[test]
    fn nonces_never_repeat() {
        let k = key("pw");
        let b = Binding::Session(SessionId([1; 32]));
        let nonces: std::collections::HashSet<[u8; 24]> =
            (0..1000).map(|_| k.seal(SealKind::Event, &b, b"x").nonce).collect();
        assert_eq!(nonces.len(), 1000);
        let other = key("pw").seal(SealKind::Event, &b, b"x").nonce;
        assert!(!nonces.contains(&other), "two keys share a nonce prefix");
    }

    #[test]
    fn an_empty_password_is_refused() {
        let error = SessionKey::derive("", &PersistentId([7; 32]), KdfParams::INSECURE_FAST).unwrap_err();
        assert_eq!(error, CryptoError::EmptyPassword);
        assert_eq!(error.to_string(), "the session password must not be empty");
    }
}
