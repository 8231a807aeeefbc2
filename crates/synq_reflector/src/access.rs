//! Which apps the reflector admits.

use std::collections::HashMap;

/// Which apps the reflector admits.
///
/// bevy_synq checks an API key at join rather than using netcode's secure connect tokens: keys need
/// no token server, and the payloads are sealed end to end anyway, so what access control protects
/// is the reflector's resources, not the sessions' content.
#[derive(Clone, Debug, Default)]
pub enum AccessControl {
    /// Anyone may join any session (local play, tests).
    #[default]
    Open,
    /// Only clients presenting one of the keys listed for their app id.
    ApiKeys(HashMap<String, Vec<String>>),
}

impl AccessControl {
    /// Whether a join for `app_id` with `key` is admitted.
    pub fn admits(&self, app_id: &str, key: Option<&str>) -> bool {
        match self {
            AccessControl::Open => true,
            AccessControl::ApiKeys(keys) => match (keys.get(app_id), key) {
                (Some(valid), Some(key)) => valid.iter().any(|v| constant_time_eq(v.as_bytes(), key.as_bytes())),
                _ => false,
            },
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
