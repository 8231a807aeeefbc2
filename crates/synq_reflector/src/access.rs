//! Which apps the reflector admits.

use std::collections::HashMap;
use synq_protocol::Hash32;
use synq_protocol::membership::{Challenge, api_key_proof};

/// Which apps the reflector admits.
///
/// bevy_synq checks an API key at join rather than using netcode's secure connect tokens: keys need
/// no token server, and the payloads are sealed end to end anyway, so what access control protects
/// is the reflector's resources, not the sessions' content (membership of a session is proved
/// separately, with the session password's key: see [`synq_protocol::membership`]). The key never
/// travels: the join carries an HMAC of the connection's challenge under the key
/// ([`synq_protocol::membership::api_key_proof`]), so a passive observer learns nothing it can
/// replay.
#[derive(Clone, Debug, Default)]
pub enum AccessControl {
    /// Anyone may join any session (local play, tests).
    #[default]
    Open,
    /// Only clients presenting one of the keys listed for their app id.
    ApiKeys(HashMap<String, Vec<String>>),
}

impl AccessControl {
    /// Whether a join for `app_id` presenting `proof` of a key for `challenge` is admitted.
    pub fn admits(&self, app_id: &str, proof: Option<&Hash32>, challenge: &Challenge) -> bool {
        match self {
            AccessControl::Open => true,
            AccessControl::ApiKeys(keys) => match (keys.get(app_id), proof) {
                (Some(valid), Some(proof)) => {
                    valid.iter().any(|key| constant_time_eq(&api_key_proof(key, challenge, app_id), proof))
                }
                _ => false,
            },
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
