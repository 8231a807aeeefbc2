//! Canonical JSON ("stable stringification"): one byte sequence per value, on every platform.
//!
//! Persisted data and the options hashed into session ids are canonical JSON, so that equal
//! values always hash equally. The format is the one Croquet gets from `fast-json-stable-stringify`
//! (verified against its session-id test vector), with refusals where JSON would be lossy:
//!
//! * **Objects**: keys sorted recursively, by UTF-16 code units (JavaScript's default sort order;
//!   it equals byte order unless keys mix characters above U+FFFF with ones in U+E000–U+FFFF).
//!   Two equal keys in one object are refused.
//! * **No whitespace** anywhere.
//! * **Strings**: `"` and `\` escaped, control characters as `\b \f \n \r \t` or `\u00XX`
//!   (lower-case hex), everything else (including non-ASCII) as raw UTF-8 — as `JSON.stringify`.
//! * **Integers** (`u8`…`u64`, `i8`…`i64`, and 128-bit ones within the 64-bit range) print exactly,
//!   in decimal. 128-bit values outside that range are refused.
//! * **Floats** print as ECMAScript's `Number.prototype.toString` does: the shortest digits that
//!   round-trip (`f32` values with the shortest digits of the `f32`), as an integer when the value
//!   is integral and below 10²¹ (`1.0` → `1`, `-0.0` → `0`), plain decimals for exponents from −7
//!   to 20 (`0.000001`, `123.5`), otherwise exponent form (`1e-7`, `1.5e+300`).
//!   **NaN and ±Infinity are refused** (serde_json would silently write `null`).
//! * **Map keys must serialize as strings** (strings, chars, unit enum variants, newtypes of
//!   those); integer or other keys are refused (serde_json would silently stringify them).
//! * `None`, `()` and unit structs are `null`; byte slices are arrays of numbers; enums use serde's
//!   externally tagged form (`"Unit"`, `{"Newtype":…}`, `{"Tuple":[…]}`, `{"Struct":{…}}`).
//!
//! Every refusal is a [`CanonicalJsonError`] naming the path of the offending value, such as
//! `$.players[2].score`.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, Serialize, SerializeMap, Serializer};
use std::fmt::{self, Write as _};

mod serializer;
mod write;

use serializer::Ser;
use write::write_string;

/// What made a value impossible to encode as canonical JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum CanonicalJsonErrorKind {
    /// A float was NaN or infinite.
    NonFiniteFloat(f64),
    /// A map key does not serialize as a string; names what it serializes as instead.
    NonStringKey(&'static str),
    /// Two entries of one object have the same key.
    DuplicateKey(String),
    /// A 128-bit integer outside the 64-bit range.
    IntegerOutOfRange(String),
    /// The input of [`canonicalize`] is not valid JSON.
    Parse(String),
    /// The value's `Serialize` implementation reported an error.
    Custom(String),
}

impl fmt::Display for CanonicalJsonErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonFiniteFloat(v) => write!(f, "{v} is not allowed (canonical JSON has no NaN or Infinity)"),
            Self::NonStringKey(what) => {
                write!(f, "map key is {what}, but canonical JSON object keys must be strings")
            }
            Self::DuplicateKey(key) => write!(f, "duplicate object key {key:?}"),
            Self::IntegerOutOfRange(v) => write!(f, "integer {v} is outside the 64-bit range"),
            Self::Parse(msg) => write!(f, "invalid JSON: {msg}"),
            Self::Custom(msg) => f.write_str(msg),
        }
    }
}

/// A value that cannot be encoded as canonical JSON, and where in it the problem is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("canonical JSON: {kind} (at {path})")]
pub struct CanonicalJsonError {
    /// JSONPath-like location of the offending value: `$` is the root, then `.key`, `["odd key"]`
    /// and `[index]` steps.
    pub path: String,
    /// What is wrong there.
    pub kind: CanonicalJsonErrorKind,
}

/// One step of an error path, collected innermost first while the error propagates.
#[derive(Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The serializer's internal error: the kind plus the path steps, innermost first.
#[derive(Debug)]
struct Error {
    kind: CanonicalJsonErrorKind,
    steps: Vec<Step>,
}

impl Error {
    fn new(kind: CanonicalJsonErrorKind) -> Self {
        Self { kind, steps: Vec::new() }
    }

    fn at(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    fn into_public(self) -> CanonicalJsonError {
        let mut path = String::from("$");
        for step in self.steps.iter().rev() {
            match step {
                Step::Index(i) => {
                    let _ = write!(path, "[{i}]");
                }
                Step::Key(k) if is_identifier(k) => {
                    let _ = write!(path, ".{k}");
                }
                Step::Key(k) => {
                    let mut quoted = Vec::new();
                    write_string(&mut quoted, k);
                    path.push('[');
                    path.push_str(&String::from_utf8_lossy(&quoted));
                    path.push(']');
                }
            }
        }
        CanonicalJsonError { path, kind: self.kind }
    }
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(CanonicalJsonErrorKind::Custom(msg.to_string()))
    }
}

/// Encodes `value` as canonical JSON bytes (see the [module documentation](self) for the format).
///
/// ```
/// use std::collections::HashMap;
/// let mut scores = HashMap::new();
/// scores.insert("zoe", 1.5);
/// scores.insert("al", 2.0);
/// let bytes = synq_protocol::canonical_json::to_canonical_vec(&scores).unwrap();
/// assert_eq!(bytes, br#"{"al":2,"zoe":1.5}"#);
/// assert!(synq_protocol::canonical_json::to_canonical_vec(&f64::NAN).is_err());
/// ```
pub fn to_canonical_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut out = Vec::with_capacity(128);
    value.serialize(Ser { out: &mut out }).map_err(Error::into_public)?;
    Ok(out)
}

/// Encodes `value` as a canonical JSON string.
pub fn to_canonical_string<T: Serialize + ?Sized>(value: &T) -> Result<String, CanonicalJsonError> {
    let bytes = to_canonical_vec(value)?;
    // The serializer only ever writes valid UTF-8 (ASCII punctuation and whole `str`s).
    String::from_utf8(bytes).map_err(|e| Error::new(CanonicalJsonErrorKind::Custom(e.to_string())).into_public())
}

/// Parses JSON text and re-encodes it canonically.
///
/// Refuses invalid JSON, duplicate keys within an object, and numbers that do not fit an `f64`.
/// Nesting deeper than 128 levels is refused by the parser.
///
/// ```
/// let c = synq_protocol::canonical_json::canonicalize(br#"{ "b": [1.0, 2.50], "a": null }"#).unwrap();
/// assert_eq!(c, br#"{"a":null,"b":[1,2.5]}"#);
/// ```
pub fn canonicalize(json: &[u8]) -> Result<Vec<u8>, CanonicalJsonError> {
    let value: Json = serde_json::from_slice(json)
        .map_err(|e| Error::new(CanonicalJsonErrorKind::Parse(e.to_string())).into_public())?;
    to_canonical_vec(&value)
}

/// A parsed JSON value that keeps object entries in input order (for [`canonicalize`]).
enum Json {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::U64(v) => s.serialize_u64(*v),
            Json::I64(v) => s.serialize_i64(*v),
            Json::F64(v) => s.serialize_f64(*v),
            Json::Str(v) => s.serialize_str(v),
            Json::Array(items) => s.collect_seq(items),
            Json::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::U64(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::I64(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::F64(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    entries.push((k, v));
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests;
