//! The model code hash: what makes a code change start a new session.
//!
//! Rust has no runtime access to a function's source as JavaScript does, so the app feeds it in
//! explicitly, typically with `include_str!` of the files that define its model:
//!
//! ```
//! use synq_protocol::code_hash::CodeHasher;
//! let mut hasher = CodeHasher::new();
//! hasher
//!     .source("model.rs", "pub struct Ship { pub x: f32 }")        // include_str!("model.rs")
//!     .registered("component", "game::model::Ship")   // done by the plugin, in registration order
//!     .registered("resource", "game::model::Score");
//! let code_hash = hasher.finish();
//! assert_eq!(code_hash.to_string().len(), 43);
//! ```
//!
//! What the hash covers:
//!
//! * every source, as `(name, text)`; sources are sorted by name (then text), so the order in
//!   which they are fed does not matter. The text is hashed byte for byte after two
//!   normalisations that keep one checkout from hashing differently on another OS: a leading
//!   UTF-8 byte-order mark is dropped and `\r\n` becomes `\n`. Comments and whitespace count, as
//!   in Croquet.
//! * every registered type as `(kind, type name)`, **in registration order**.
//!
//! Code that the model calls but that is not fed in (helper modules, dependencies) is *not*
//! covered — Croquet's documented foot-gun, and the same here: feed every file the model's
//! behaviour depends on. Type names from `std::any::type_name` may change with the compiler
//! version, which then starts a new session.
//!
//! For debugging, [`CodeHasher::hash_override`] forces the result (like Croquet's
//! `hashOverride`), e.g. to reopen the session of an older build; [`CodeHasher::entries`] lists
//! every part with its own hash so two builds can be compared.

use crate::ids::{CodeHash, Hash32, base64url, hash_parts};
use std::fmt;

/// What one part of the code hash is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Source text fed with [`CodeHasher::source`].
    Source,
    /// A type registered with [`CodeHasher::registered`].
    Registered,
}

/// One part of the code hash, for debugging: see [`CodeHasher::entries`].
#[derive(Clone, PartialEq, Eq)]
pub struct CodeHashEntry {
    /// Source or registered type.
    pub kind: EntryKind,
    /// The source's name, or `kind type_name` of a registered type.
    pub label: String,
    /// The hash of this part alone.
    pub hash: Hash32,
}

impl fmt::Debug for CodeHashEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} {}", self.kind, self.label, base64url(&self.hash))
    }
}

/// Builds a [`CodeHash`] from the model's source text and registered types.
#[derive(Clone, Debug, Default)]
pub struct CodeHasher {
    sources: Vec<(String, String)>,
    registered: Vec<(String, String)>,
    hash_override: Option<CodeHash>,
}

impl CodeHasher {
    /// An empty hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the source text of a model file; `name` identifies it (e.g. its path).
    pub fn source(&mut self, name: &str, text: &str) -> &mut Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        self.sources.push((name.to_owned(), text.replace("\r\n", "\n")));
        self
    }

    /// Adds a registered model type. `kind` says what it was registered as (`"component"`,
    /// `"resource"`, `"event"`, …). Call in registration order.
    pub fn registered(&mut self, kind: &str, type_name: &str) -> &mut Self {
        self.registered.push((kind.to_owned(), type_name.to_owned()));
        self
    }

    /// Forces [`finish`](Self::finish) to return `hash`, whatever was fed. For debugging only:
    /// a session opened this way runs code that does not match its id, so the plugin should not
    /// write snapshots for it.
    pub fn hash_override(&mut self, hash: CodeHash) -> &mut Self {
        self.hash_override = Some(hash);
        self
    }

    /// Whether [`hash_override`](Self::hash_override) was used.
    pub fn is_overridden(&self) -> bool {
        self.hash_override.is_some()
    }

    /// Every part the hash covers, in the order they are hashed, each with its own hash.
    pub fn entries(&self) -> Vec<CodeHashEntry> {
        let mut sources: Vec<&(String, String)> = self.sources.iter().collect();
        sources.sort();
        let sources = sources.into_iter().map(|(name, text)| CodeHashEntry {
            kind: EntryKind::Source,
            label: name.clone(),
            hash: hash_parts(&[b"source", name.as_bytes(), text.as_bytes()]),
        });
        let registered = self.registered.iter().map(|(kind, type_name)| CodeHashEntry {
            kind: EntryKind::Registered,
            label: format!("{kind} {type_name}"),
            hash: hash_parts(&[b"registered", kind.as_bytes(), type_name.as_bytes()]),
        });
        sources.chain(registered).collect()
    }

    /// The code hash: the override if one was set, else the hash of every [entry](Self::entries)
    /// in order.
    pub fn finish(&self) -> CodeHash {
        if let Some(forced) = self.hash_override {
            return forced;
        }
        let entries = self.entries();
        let mut parts: Vec<&[u8]> = vec![b"bevy_synq code v1"];
        parts.extend(entries.iter().map(|e| &e.hash[..]));
        CodeHash(hash_parts(&parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(f: impl FnOnce(&mut CodeHasher)) -> CodeHash {
        let mut h = CodeHasher::new();
        f(&mut h);
        h.finish()
    }

    #[test]
    fn source_order_does_not_matter_but_registration_order_does() {
        let a = hash(|h| {
            h.source("a.rs", "A").source("b.rs", "B").registered("component", "X").registered("component", "Y");
        });
        let b = hash(|h| {
            h.source("b.rs", "B").source("a.rs", "A").registered("component", "X").registered("component", "Y");
        });
        let c = hash(|h| {
            h.source("a.rs", "A").source("b.rs", "B").registered("component", "Y").registered("component", "X");
        });
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_change_counts() {
        let base = hash(|h| {
            h.source("m.rs", "fn f() {}").registered("component", "X");
        });
        assert_ne!(
            base,
            hash(|h| {
                h.source("m.rs", "fn f() { }").registered("component", "X");
            })
        );
        assert_ne!(
            base,
            hash(|h| {
                h.source("n.rs", "fn f() {}").registered("component", "X");
            })
        );
        assert_ne!(
            base,
            hash(|h| {
                h.source("m.rs", "fn f() {}").registered("resource", "X");
            })
        );
        assert_ne!(
            base,
            hash(|h| {
                h.source("m.rs", "fn f() {}");
            })
        );
        assert_ne!(
            hash(|_| {}),
            hash(|h| {
                h.source("", "");
            })
        );
    }

    #[test]
    fn line_endings_and_bom_do_not_count() {
        let unix = hash(|h| {
            h.source("m.rs", "a\nb\n");
        });
        assert_eq!(
            unix,
            hash(|h| {
                h.source("m.rs", "\u{feff}a\r\nb\r\n");
            })
        );
    }

    #[test]
    fn override_wins_and_entries_explain() {
        let forced = CodeHash([9; 32]);
        let mut h = CodeHasher::new();
        h.source("m.rs", "x").registered("component", "X");
        assert!(!h.is_overridden());
        let entries = h.entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].label, "component X");
        assert!(format!("{:?}", entries[0]).starts_with("Source m.rs "));
        h.hash_override(forced);
        assert!(h.is_overridden());
        assert_eq!(h.finish(), forced);
    }
}
