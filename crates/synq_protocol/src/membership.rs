//! Membership: how a client proves to the reflector that it holds the session password, without
//! telling it anything the reflector could use to open a session's data.
//!
//! Every [`SessionKey`] carries an Ed25519 signing key pair derived from the password-derived
//! master key (HKDF-SHA-256 with its own domain tag, so it reveals nothing about the sealing and
//! vote keys). Its verifying half, the [`MemberKey`], is the same for every holder of the password
//! of a persistent id and for every code version. The reflector:
//!
//! 1. sends a fresh random [`Challenge`] as the first message of every connection;
//! 2. pins the [`MemberKey`] of a persistent id the first time the id is seen, durably, and
//!    refuses a join that presents another key ("wrong session password");
//! 3. checks the join's [`MemberSignature`] over the challenge and every field of the join
//!    ([`join_transcript`]), so a recorded join is useless on another connection;
//! 4. accepts snapshot and persisted-data uploads only from joined members, and only with a
//!    valid signature over the record ([`snapshot_transcript`], [`persist_transcript`]).
//!
//! The API key of an app is proved the same way: the join carries
//! `HMAC-SHA-256(api key, challenge ‖ app id)` ([`api_key_proof`]), never the key.
//!
//! ```
//! use synq_protocol::crypto::SessionKey;
//! use synq_protocol::membership::{Challenge, verify};
//!
//! let key = SessionKey::from_master(&[7; 32]);
//! let challenge = Challenge([1; 32]);
//! let transcript = [b"anything bound to the challenge".as_slice(), &challenge.0].concat();
//! let signature = key.sign_member(&transcript);
//! assert!(verify(&key.member_key(), &transcript, &signature));
//! assert!(!verify(&SessionKey::from_master(&[8; 32]).member_key(), &transcript, &signature));
//! ```
//!

use crate::crypto::{Sealed, SessionKey};
use crate::ids::{Hash32, PersistentId, SessionId, ViewId, sha256};
use crate::wire::{Join, PersistRecord, SnapshotRecord};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A fresh random value the reflector sends at the start of every connection; the join's
/// signature covers it, which binds the proof to that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge(pub [u8; 32]);

impl Challenge {
    /// A challenge from the operating system's random source.
    pub fn random() -> Self {
        use chacha20poly1305::aead::rand_core::RngCore;
        let mut bytes = [0; 32];
        chacha20poly1305::aead::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }
}

/// The Ed25519 verifying key of a session password's signing key pair: public, the same for every
/// holder of the password of a persistent id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberKey(pub [u8; 32]);

/// An Ed25519 signature by a [`MemberKey`]'s signing key (`r ‖ s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSignature {
    /// The first 32 bytes (the curve point R).
    pub r: [u8; 32],
    /// The last 32 bytes (the scalar s).
    pub s: [u8; 32],
}

impl MemberSignature {
    /// The 64 bytes of the signature.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut bytes = [0; 64];
        bytes[..32].copy_from_slice(&self.r);
        bytes[32..].copy_from_slice(&self.s);
        bytes
    }

    /// A signature from its 64 bytes.
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let mut r = [0; 32];
        let mut s = [0; 32];
        r.copy_from_slice(&bytes[..32]);
        s.copy_from_slice(&bytes[32..]);
        Self { r, s }
    }

    /// A placeholder to be replaced by a real signature before sending.
    pub const EMPTY: Self = Self { r: [0; 32], s: [0; 32] };
}

/// Whether `signature` is `key`'s signature of `message` (strict verification: no malleable or
/// small-order encodings are accepted).
pub fn verify(key: &MemberKey, message: &[u8], signature: &MemberSignature) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key.0) else { return false };
    let signature = ed25519_dalek::Signature::from_bytes(&signature.to_bytes());
    key.verify_strict(message, &signature).is_ok()
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// What a join's signature covers: the reflector's challenge and every field of the join but the
/// signature itself, each length-prefixed.
pub fn join_transcript(challenge: &Challenge, join: &Join) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    push_field(&mut out, b"bevy_synq join v1");
    push_field(&mut out, &challenge.0);
    push_field(&mut out, &join.protocol.to_le_bytes());
    push_field(&mut out, join.app_id.as_bytes());
    push_field(&mut out, join.api_key_proof.as_ref().map_or(&[][..], |p| &p[..]));
    push_field(&mut out, join.session_id.as_bytes());
    push_field(&mut out, join.persistent_id.as_bytes());
    push_field(&mut out, &join.view_id.0.to_le_bytes());
    push_field(&mut out, &join.tick_ms.to_le_bytes());
    match join.resume_after {
        Some(after) => push_field(&mut out, &[&[1u8][..], &after.to_le_bytes()].concat()),
        None => push_field(&mut out, &[0]),
    }
    push_field(&mut out, &join.held_time.to_le_bytes());
    push_field(&mut out, &join.member_key.0);
    out
}

fn sealed_digest(sealed: &Sealed) -> Hash32 {
    let mut bytes = Vec::with_capacity(sealed.nonce.len() + sealed.ciphertext.len());
    bytes.extend_from_slice(&sealed.nonce);
    bytes.extend_from_slice(&sealed.ciphertext);
    sha256(&bytes)
}

/// What a snapshot upload's signature covers: the session, the point, the vote and a digest of
/// the sealed data.
pub fn snapshot_transcript(session: &SessionId, record: &SnapshotRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    push_field(&mut out, b"bevy_synq snapshot v1");
    push_field(&mut out, session.as_bytes());
    push_field(&mut out, &record.time.to_le_bytes());
    push_field(&mut out, &record.seq.to_le_bytes());
    push_field(&mut out, &record.vote);
    push_field(&mut out, &sealed_digest(&record.data));
    out
}

/// What a persisted-data upload's signature covers: the persistent id, the request's time, the
/// vote and a digest of the sealed document.
pub fn persist_transcript(persistent: &PersistentId, record: &PersistRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    push_field(&mut out, b"bevy_synq persist v1");
    push_field(&mut out, persistent.as_bytes());
    push_field(&mut out, &record.time.to_le_bytes());
    push_field(&mut out, &record.vote);
    push_field(&mut out, &sealed_digest(&record.data));
    out
}

/// Signs `join` for the connection that sent `challenge`: sets its member key and signature.
pub fn sign_join(key: &SessionKey, challenge: &Challenge, join: &mut Join) {
    join.member_key = key.member_key();
    join.signature = key.sign_member(&join_transcript(challenge, join));
}

/// A join of `view` to `session` (no resume, no API key, the session's default tick), signed by
/// `key` for `challenge`: what tools and tests that speak the wire protocol send.
pub fn member_join(
    key: &SessionKey,
    challenge: &Challenge,
    app_id: &str,
    session: SessionId,
    persistent: PersistentId,
    view: ViewId,
) -> Join {
    let mut join = Join {
        protocol: crate::PROTOCOL_VERSION,
        app_id: app_id.to_string(),
        api_key_proof: None,
        session_id: session,
        persistent_id: persistent,
        view_id: view,
        tick_ms: 0,
        resume_after: None,
        held_time: 0,
        member_key: key.member_key(),
        signature: MemberSignature::EMPTY,
    };
    sign_join(key, challenge, &mut join);
    join
}

/// Signs a snapshot upload of `session`.
pub fn sign_snapshot(key: &SessionKey, session: &SessionId, record: &mut SnapshotRecord) {
    record.signature = key.sign_member(&snapshot_transcript(session, record));
}

/// Signs a persisted-data upload of `persistent`.
pub fn sign_persist(key: &SessionKey, persistent: &PersistentId, record: &mut PersistRecord) {
    record.signature = key.sign_member(&persist_transcript(persistent, record));
}

/// The proof of an API key for a join: `HMAC-SHA-256(key, domain ‖ challenge ‖ app id)`. The
/// reflector computes the same from the keys it knows; the key itself never travels.
pub fn api_key_proof(api_key: &str, challenge: &Challenge, app_id: &str) -> Hash32 {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(api_key.as_bytes()).expect("HMAC takes keys of any length");
    let mut message = Vec::with_capacity(96);
    push_field(&mut message, b"bevy_synq api key v1");
    push_field(&mut message, &challenge.0);
    push_field(&mut message, app_id.as_bytes());
    mac.update(&message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::base64url;

    fn join(key: &SessionKey) -> Join {
        Join {
            protocol: crate::PROTOCOL_VERSION,
            app_id: "io.example.test".into(),
            api_key_proof: None,
            session_id: SessionId([3; 32]),
            persistent_id: PersistentId([4; 32]),
            view_id: ViewId(9),
            tick_ms: 50,
            resume_after: None,
            held_time: 0,
            member_key: key.member_key(),
            signature: MemberSignature::EMPTY,
        }
    }

    #[test]
    fn the_member_key_is_a_golden_vector() {
        // Changing the derivation orphans every pinned key: this must never change silently.
        let key = SessionKey::from_master(&[7; 32]);
        assert_eq!(base64url(&key.member_key().0), "To3KX8zNKc5JwZUKqeWE_T3NouZrVOp_e_w_Vrjr-BE");
        let signature = key.sign_member(b"bevy_synq golden");
        assert_eq!(
            base64url(&signature.to_bytes()),
            "oho1X2-qLnnQxPFsYJazg8XHnzzx3s-_jvi5Ua53H_qKKBmBIh8YPMMkQ4u5NRbDzHd3CRgMu3HdQv4itrbmBw"
        );
    }

    #[test]
    fn a_join_proof_holds_only_for_its_challenge_and_fields() {
        let key = SessionKey::from_master(&[1; 32]);
        let challenge = Challenge([5; 32]);
        let mut join = join(&key);
        sign_join(&key, &challenge, &mut join);
        assert!(verify(&join.member_key, &join_transcript(&challenge, &join), &join.signature));
        // Replayed on another connection (another challenge): refused.
        assert!(!verify(&join.member_key, &join_transcript(&Challenge([6; 32]), &join), &join.signature));
        // Any field changed: refused.
        let mut other = join.clone();
        other.view_id = ViewId(10);
        assert!(!verify(&other.member_key, &join_transcript(&challenge, &other), &other.signature));
        // Another password's key claiming the signature: refused.
        let intruder = SessionKey::from_master(&[2; 32]);
        assert!(!verify(&intruder.member_key(), &join_transcript(&challenge, &join), &join.signature));
    }

    #[test]
    fn garbage_keys_and_signatures_are_refused_without_panic() {
        let message = b"m";
        for key in [[0u8; 32], [0xFF; 32], [1; 32]] {
            assert!(!verify(&MemberKey(key), message, &MemberSignature::EMPTY));
            assert!(!verify(&MemberKey(key), message, &MemberSignature { r: [0xFF; 32], s: [0xFF; 32] }));
        }
    }

    #[test]
    fn api_key_proofs_depend_on_key_challenge_and_app() {
        let challenge = Challenge([1; 32]);
        let proof = api_key_proof("k1", &challenge, "app");
        assert_eq!(proof, api_key_proof("k1", &challenge, "app"));
        assert_ne!(proof, api_key_proof("k2", &challenge, "app"));
        assert_ne!(proof, api_key_proof("k1", &Challenge([2; 32]), "app"));
        assert_ne!(proof, api_key_proof("k1", &challenge, "app2"));
    }
}
