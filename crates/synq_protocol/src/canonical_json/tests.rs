use super::write::{ObjectKey, utf16_cmp};
use super::*;
use proptest::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

fn s<T: Serialize + ?Sized>(v: &T) -> String {
    to_canonical_string(v).unwrap()
}

#[test]
fn sorts_keys_recursively_and_drops_whitespace() {
    let input = br#" { "b" : { "y": 1, "x": [ {"d":1,"c":2} ] }, "a": "text" } "#;
    assert_eq!(canonicalize(input).unwrap(), br#"{"a":"text","b":{"x":[{"c":2,"d":1}],"y":1}}"#);
}

#[test]
fn struct_fields_are_sorted_too() {
    #[derive(Serialize)]
    struct Player {
        name: &'static str,
        ammo: u8,
        pos: (f32, f32),
    }
    assert_eq!(s(&Player { name: "p", ammo: 3, pos: (0.5, -2.0) }), r#"{"ammo":3,"name":"p","pos":[0.5,-2]}"#);
}

#[test]
fn floats_use_the_ecmascript_format() {
    let cases: &[(f64, &str)] = &[
        (1.0, "1"),
        (-0.0, "0"),
        (0.0, "0"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (123.456, "123.456"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e300, "1.5e+300"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (1.25e-7, "1.25e-7"),
        (5e-324, "5e-324"),
        (f64::MAX, "1.7976931348623157e+308"),
        (9007199254740993.0, "9007199254740992"),
        (1.0 / 3.0, "0.3333333333333333"),
    ];
    for (value, expected) in cases {
        assert_eq!(s(value), *expected, "{value:e}");
    }
    // f32 values print with the shortest digits of the f32, not of its f64 widening.
    assert_eq!(s(&0.1f32), "0.1");
    assert_eq!(s(&16777216f32), "16777216");
}

#[test]
fn integers_print_exactly() {
    assert_eq!(s(&u64::MAX), "18446744073709551615");
    assert_eq!(s(&i64::MIN), "-9223372036854775808");
    assert_eq!(s(&(u64::MAX as u128)), "18446744073709551615");
    let err = to_canonical_vec(&(u64::MAX as u128 + 1)).unwrap_err();
    assert!(matches!(err.kind, CanonicalJsonErrorKind::IntegerOutOfRange(_)));
}

#[test]
fn strings_are_escaped_like_json_stringify() {
    assert_eq!(s("a\"b\\c\n\t\u{1}\u{1f}é😀/"), r#""a\"b\\c\n\t\u0001\u001fé😀/""#);
    assert_eq!(s(&'\u{8}'), r#""\b""#);
}

#[test]
fn nan_and_infinity_are_refused_with_their_path() {
    #[derive(Serialize)]
    struct Player {
        score: f64,
    }
    #[derive(Serialize)]
    struct Game {
        players: Vec<Player>,
    }
    let game = Game { players: vec![Player { score: 1.0 }, Player { score: 2.0 }, Player { score: f64::NAN }] };
    let err = to_canonical_vec(&game).unwrap_err();
    assert_eq!(err.path, "$.players[2].score");
    assert!(matches!(err.kind, CanonicalJsonErrorKind::NonFiniteFloat(v) if v.is_nan()));
    assert!(err.to_string().contains("NaN is not allowed"), "{err}");
    let err = to_canonical_vec(&[f32::INFINITY]).unwrap_err();
    assert_eq!(err.path, "$[0]");
    let mut odd = BTreeMap::new();
    odd.insert("a key", f64::NEG_INFINITY);
    assert_eq!(to_canonical_vec(&odd).unwrap_err().path, r#"$["a key"]"#);
}

#[test]
fn non_string_keys_are_refused() {
    let mut m = BTreeMap::new();
    m.insert(1u32, "x");
    let err = to_canonical_vec(&BTreeMap::from([("scores", m)])).unwrap_err();
    assert_eq!(err.path, "$.scores");
    assert_eq!(err.kind, CanonicalJsonErrorKind::NonStringKey("an integer"));
    assert!(err.to_string().contains("keys must be strings"), "{err}");
    let err = to_canonical_vec(&HashMap::from([((1, 2), 3)])).unwrap_err();
    assert_eq!(err.kind, CanonicalJsonErrorKind::NonStringKey("a tuple"));
}

#[test]
fn string_like_keys_are_accepted() {
    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    enum Team {
        Red,
        Blue,
    }
    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    struct Name(String);
    assert_eq!(s(&BTreeMap::from([(Team::Red, 1), (Team::Blue, 2)])), r#"{"Blue":2,"Red":1}"#);
    assert_eq!(s(&BTreeMap::from([(Name("z".into()), 1), (Name("a".into()), 2)])), r#"{"a":2,"z":1}"#);
    assert_eq!(s(&BTreeMap::from([('b', 1), ('a', 2)])), r#"{"a":2,"b":1}"#);
}

#[test]
fn enums_are_externally_tagged() {
    #[derive(Serialize)]
    enum E {
        Unit,
        New(u8),
        Tuple(u8, f32),
        Struct { z: u8, a: Option<u8> },
    }
    assert_eq!(s(&[E::Unit, E::New(1), E::Tuple(1, 0.5), E::Struct { z: 1, a: None }]), {
        r#"["Unit",{"New":1},{"Tuple":[1,0.5]},{"Struct":{"a":null,"z":1}}]"#
    });
    let err = to_canonical_vec(&E::Tuple(0, f32::NAN)).unwrap_err();
    assert_eq!(err.path, "$.Tuple[1]");
}

#[test]
fn duplicate_keys_are_refused() {
    let err = canonicalize(br#"{"a":{"k":1,"k":2}}"#).unwrap_err();
    assert_eq!(err.kind, CanonicalJsonErrorKind::DuplicateKey("k".into()));
    assert_eq!(err.path, "$.a");
}

#[test]
fn invalid_json_is_refused() {
    for bad in [&b""[..], b"{", b"[1,]", b"{\"a\" 1}", b"1e999", b"\"\xff\"", b"nul", b"{} x"] {
        let err = canonicalize(bad).unwrap_err();
        assert!(matches!(err.kind, CanonicalJsonErrorKind::Parse(_)), "{bad:?}: {err}");
    }
    let deep = "[".repeat(10_000);
    assert!(canonicalize(deep.as_bytes()).is_err());
}

#[test]
fn keys_sort_by_utf16_code_units() {
    // U+FF5E is one UTF-16 unit 0xFF5E, U+1F600 is the surrogate pair 0xD83D 0xDE00: JavaScript
    // sorts the emoji first although its code point is larger.
    assert_eq!(s(&BTreeMap::from([("\u{FF5E}", 1), ("\u{1F600}", 2)])), "{\"\u{1F600}\":2,\"\u{FF5E}\":1}");
}

#[test]
fn unsorted_serialize_order_is_reordered() {
    struct Pairs(Vec<(&'static str, u8)>);
    impl Serialize for Pairs {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }
    assert_eq!(s(&Pairs(vec![("c", 3), ("a", 1), ("b", 2)])), r#"{"a":1,"b":2,"c":3}"#);
    assert_eq!(s(&Pairs(vec![])), "{}");
    let err = to_canonical_vec(&Pairs(vec![("a", 1), ("a", 2)])).unwrap_err();
    assert_eq!(err.kind, CanonicalJsonErrorKind::DuplicateKey("a".into()));
}

/// A JSON-able value for property tests: objects as unique-key entry lists.
#[derive(Clone, Debug)]
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// Rebuilds every object with its entries in a different order, chosen by `seed`.
    fn reordered(&self, seed: u64) -> Value {
        match self {
            Value::Array(items) => Value::Array(items.iter().map(|v| v.reordered(seed)).collect()),
            Value::Object(entries) => {
                let mut entries: Vec<_> = entries.iter().map(|(k, v)| (k.clone(), v.reordered(seed))).collect();
                let n = entries.len().max(1);
                entries.rotate_left(seed as usize % n);
                if seed & 1 == 1 {
                    entries.reverse();
                }
                Value::Object(entries)
            }
            other => other.clone(),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Str(v) => s.serialize_str(v),
            Value::Array(items) => s.collect_seq(items),
            Value::Object(entries) => s.collect_map(entries.iter().map(|(k, v)| (k, v))),
        }
    }
}

fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::Float),
        (-1e6f64..1e6).prop_map(Value::Float),
        "\\PC{0,8}".prop_map(Value::Str),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\\u{e9}\\u{1F600}\\u{FF5E}\"\\\\ ]{0,5}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn insertion_order_does_not_matter(value in value_strategy(), seed in any::<u64>()) {
        let a = to_canonical_vec(&value).unwrap();
        let b = to_canonical_vec(&value.reordered(seed)).unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn encode_parse_encode_is_identical(value in value_strategy()) {
        let once = to_canonical_vec(&value).unwrap();
        let twice = canonicalize(&once).unwrap();
        prop_assert_eq!(&once, &twice);
        // And serde_json reads it back as the same JSON.
        let parsed: serde_json::Value = serde_json::from_slice(&once).unwrap();
        prop_assert_eq!(to_canonical_vec(&parsed).unwrap(), once);
    }

    #[test]
    fn floats_round_trip_exactly(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        let text = to_canonical_string(&f).unwrap();
        let back: f64 = text.parse().unwrap();
        prop_assert!(back == f, "{} -> {} -> {}", f, text, back);
    }

    #[test]
    fn fast_key_order_is_utf16_order(a in "[a\u{e9}\u{FF5E}\u{E000}\u{1F600}\u{10000}]{0,4}", b in "[a\u{e9}\u{FF5E}\u{E000}\u{1F600}\u{10000}]{0,4}") {
        let expected = a.encode_utf16().cmp(b.encode_utf16());
        prop_assert_eq!(utf16_cmp(&a, &b), expected);
        let (ka, kb) = (ObjectKey::new(a.clone().into()), ObjectKey::new(b.clone().into()));
        prop_assert_eq!(ka.cmp(&kb), expected);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = canonicalize(&bytes);
    }
}
