//! Recomputes the golden vectors in `tests/vectors/*.json`, so that any change of an id, of the
//! canonical JSON format or of the key derivation and sealing is caught.
//!
//! Such a change orphans every existing session, snapshot and persisted document. If it is
//! intended, change the domain tag (`… v1` → `… v2`) of what changed, then regenerate with
//! `SYNQ_UPDATE_VECTORS=1 cargo test -p synq_protocol --test vectors` and commit the diff.

use serde_json::Value;
use std::path::PathBuf;
use synq_protocol::canonical_json::{canonicalize, to_canonical_vec};
use synq_protocol::code_hash::CodeHasher;
use synq_protocol::crypto::{Binding, KdfParams, SealKind, Sealed, SessionKey};
use synq_protocol::ids::{base64url, from_base64url, sha256};
use synq_protocol::{AppId, CodeHash, IdOptions, PersistentId, SessionId, SessionName, ViewId};

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors").join(name)
}

fn updating() -> bool {
    std::env::var_os("SYNQ_UPDATE_VECTORS").is_some_and(|v| v == "1")
}

/// Loads a vector file, lets `check` compare (or fill in) every case, and rewrites the file when
/// updating.
fn with_file(name: &str, check: impl FnOnce(&mut Value, &mut Vec<String>)) {
    let text = std::fs::read_to_string(path(name)).unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    let mut mismatches = Vec::new();
    check(&mut doc, &mut mismatches);
    if updating() {
        std::fs::write(path(name), serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
    } else {
        assert!(
            mismatches.is_empty(),
            "{name}: golden vectors changed — this orphans existing sessions/data:\n{}",
            mismatches.join("\n")
        );
    }
}

/// Compares `actual` with the case's `field`, or stores it there when updating.
fn expect(case: &mut Value, field: &str, actual: String, mismatches: &mut Vec<String>) {
    if updating() {
        case[field] = Value::String(actual);
    } else if case[field].as_str() != Some(actual.as_str()) {
        mismatches.push(format!("{case}\n  computed {field} = {actual}"));
    }
}

fn options(value: &Value) -> IdOptions {
    IdOptions::from_serialize(value).unwrap()
}

fn persistent_id(case: &Value, options_field: &str) -> PersistentId {
    let app = AppId::new(case["app_id"].as_str().unwrap()).unwrap();
    let name = SessionName::new(case["name"].as_str().unwrap()).unwrap();
    let opts = case.get(options_field).map_or_else(IdOptions::none, options);
    PersistentId::derive(&app, &name, &opts)
}

fn cases<'a>(doc: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    doc[key].as_array_mut().unwrap()
}

#[test]
fn id_vectors() {
    with_file("ids.json", |doc, mismatches| {
        for case in cases(doc, "persistent_id") {
            let id = persistent_id(case, "options");
            expect(case, "expected", id.to_string(), mismatches);
        }
        for case in cases(doc, "session_id") {
            let pid = persistent_id(case, "persistent_options");
            let code = CodeHash::parse(case["code_hash"].as_str().unwrap()).unwrap();
            let version = case["library_version"].as_str().unwrap();
            let id = SessionId::derive(&pid, &code, version, &options(&case["session_options"]));
            expect(case, "expected", id.to_string(), mismatches);
        }
        for case in cases(doc, "code_hash") {
            let mut hasher = CodeHasher::new();
            for pair in case["sources"].as_array().unwrap() {
                hasher.source(pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            }
            for pair in case["registered"].as_array().unwrap() {
                hasher.registered(pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            }
            if let Some(forced) = case["override"].as_str() {
                hasher.hash_override(CodeHash::parse(forced).unwrap());
            }
            expect(case, "expected", hasher.finish().to_string(), mismatches);
        }
        for case in cases(doc, "plain_sha256") {
            let digest = base64url(&sha256(case["input"].as_str().unwrap().as_bytes()));
            // Published by Croquet, never regenerated.
            assert_eq!(case["expected"].as_str(), Some(digest.as_str()), "{case}");
        }
    });
}

#[test]
fn canonical_json_vectors() {
    with_file("canonical_json.json", |doc, mismatches| {
        for case in cases(doc, "accept") {
            let input = case["input"].as_str().unwrap().to_owned();
            let canonical = canonicalize(input.as_bytes()).unwrap();
            assert_eq!(canonicalize(&canonical).unwrap(), canonical, "not idempotent: {case}");
            let parsed: Value = serde_json::from_slice(&canonical).unwrap();
            assert_eq!(to_canonical_vec(&parsed).unwrap(), canonical, "serde_json disagrees: {case}");
            expect(case, "expected", String::from_utf8(canonical).unwrap(), mismatches);
        }
        for case in cases(doc, "refuse") {
            let err = canonicalize(case["input"].as_str().unwrap().as_bytes()).unwrap_err().to_string();
            assert!(err.contains(case["error"].as_str().unwrap()), "{case}: {err}");
        }
    });
}

fn key(case: &Value) -> (SessionKey, PersistentId) {
    let params = match case["kdf"].as_str().unwrap() {
        "INSECURE_FAST" => KdfParams::INSECURE_FAST,
        "RECOMMENDED" => KdfParams::RECOMMENDED,
        other => panic!("unknown kdf {other}"),
    };
    let pid = persistent_id(case, "options");
    (SessionKey::derive(case["password"].as_str().unwrap(), &pid, params).unwrap(), pid)
}

fn id32(case: &Value, field: &str) -> [u8; 32] {
    from_base64url(case[field].as_str().unwrap()).unwrap().try_into().unwrap()
}

#[test]
fn crypto_vectors() {
    with_file("crypto.json", |doc, mismatches| {
        for case in cases(doc, "keys") {
            let (key, _) = key(case);
            let digest = key.vote_digest(&id32(case, "state_hash"));
            expect(case, "vote_digest", base64url(&digest), mismatches);
            // The membership key is pinned by reflectors: it must never change silently either.
            expect(case, "member_key", base64url(&key.member_key().0), mismatches);
        }
        for case in cases(doc, "sealed") {
            let (key, pid) = key(case);
            let kind = match case["kind"].as_str().unwrap() {
                "Event" => SealKind::Event,
                "Snapshot" => SealKind::Snapshot,
                "Persisted" => SealKind::Persisted,
                "ViewData" => SealKind::ViewData,
                other => panic!("unknown kind {other}"),
            };
            let binding = match case["binding"].as_str().unwrap() {
                "session" => Binding::Session(SessionId(id32(case, "session_id"))),
                "session_view" => {
                    Binding::SessionView(SessionId(id32(case, "session_id")), ViewId(case["view"].as_u64().unwrap()))
                }
                "persistent" => Binding::Persistent(pid),
                other => panic!("unknown binding {other}"),
            };
            let plaintext = case["plaintext"].as_str().unwrap().as_bytes().to_vec();
            if updating() && case["nonce"].as_str() == Some("") {
                let sealed = key.seal(kind, &binding, &plaintext);
                case["nonce"] = Value::String(base64url(&sealed.nonce));
                case["ciphertext"] = Value::String(base64url(&sealed.ciphertext));
            }
            let sealed =
                Sealed { nonce: id24(case), ciphertext: from_base64url(case["ciphertext"].as_str().unwrap()).unwrap() };
            match key.open(kind, &binding, &sealed) {
                Ok(opened) if opened == plaintext => {}
                other => mismatches.push(format!("{case}\n  opened: {other:?}")),
            }
        }
    });
}

fn id24(case: &Value) -> [u8; 24] {
    from_base64url(case["nonce"].as_str().unwrap()).unwrap().try_into().unwrap()
}
