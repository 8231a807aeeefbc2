//! The serde `Serializer` that writes canonical JSON, and the one that checks map keys.

use super::write::{ObjectKey, write_display, write_float, write_string};
use super::{CanonicalJsonErrorKind, Error, Step};
use serde::ser::{self, Serialize, Serializer};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

pub(super) struct Ser<'a> {
    pub(super) out: &'a mut Vec<u8>,
}

impl<'a> Serializer for Ser<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = SeqSer<'a>;
    type SerializeTuple = SeqSer<'a>;
    type SerializeTupleStruct = SeqSer<'a>;
    type SerializeTupleVariant = SeqSer<'a>;
    type SerializeMap = MapSer<'a>;
    type SerializeStruct = MapSer<'a>;
    type SerializeStructVariant = MapSer<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.serialize_i64(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        write_display(self.out, v);
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        if let Ok(v) = i64::try_from(v) {
            self.serialize_i64(v)
        } else if let Ok(v) = u64::try_from(v) {
            self.serialize_u64(v)
        } else {
            Err(Error::new(CanonicalJsonErrorKind::IntegerOutOfRange(v.to_string())))
        }
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.serialize_u64(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        write_display(self.out, v);
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        match u64::try_from(v) {
            Ok(v) => self.serialize_u64(v),
            Err(_) => Err(Error::new(CanonicalJsonErrorKind::IntegerOutOfRange(v.to_string()))),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        if !v.is_finite() {
            return Err(Error::new(CanonicalJsonErrorKind::NonFiniteFloat(v.into())));
        }
        write_float(self.out, v);
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        if !v.is_finite() {
            return Err(Error::new(CanonicalJsonErrorKind::NonFiniteFloat(v)));
        }
        write_float(self.out, v);
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        write_string(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        let mut seq = self.serialize_seq(Some(v.len()))?;
        for b in v {
            ser::SerializeSeq::serialize_element(&mut seq, b)?;
        }
        ser::SerializeSeq::end(seq)
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.out.push(b'{');
        write_string(self.out, variant);
        self.out.push(b':');
        value.serialize(Ser { out: &mut *self.out }).map_err(|e| e.at(Step::Key(variant.to_owned())))?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<SeqSer<'a>, Error> {
        self.out.push(b'[');
        Ok(SeqSer { out: self.out, index: 0, variant: None })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqSer<'a>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<SeqSer<'a>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<SeqSer<'a>, Error> {
        self.out.push(b'{');
        write_string(self.out, variant);
        self.out.extend_from_slice(b":[");
        Ok(SeqSer { out: self.out, index: 0, variant: Some(variant) })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapSer<'a>, Error> {
        Ok(MapSer::new(self.out, None))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<MapSer<'a>, Error> {
        Ok(MapSer::new(self.out, None))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<MapSer<'a>, Error> {
        self.out.push(b'{');
        write_string(self.out, variant);
        self.out.push(b':');
        Ok(MapSer::new(self.out, Some(variant)))
    }
}

/// Arrays (and the array inside a tuple variant).
pub(super) struct SeqSer<'a> {
    out: &'a mut Vec<u8>,
    index: usize,
    variant: Option<&'static str>,
}

impl SeqSer<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        if self.index > 0 {
            self.out.push(b',');
        }
        let variant = self.variant;
        let index = self.index;
        value.serialize(Ser { out: &mut *self.out }).map_err(|e| {
            let e = e.at(Step::Index(index));
            match variant {
                Some(v) => e.at(Step::Key(v.to_owned())),
                None => e,
            }
        })?;
        self.index += 1;
        Ok(())
    }

    fn finish(self) -> Result<(), Error> {
        self.out.push(b']');
        if self.variant.is_some() {
            self.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeSeq for SeqSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTuple for SeqSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for SeqSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for SeqSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

/// Objects: entries are written in arrival order as `"key":value`, remembering where each one
/// is; `end` reorders them by key only if they did not arrive sorted.
pub(super) struct MapSer<'a> {
    out: &'a mut Vec<u8>,
    /// Where the first entry starts (just after `{`).
    body_start: usize,
    /// Each entry's key and byte range in `out`.
    entries: Vec<(ObjectKey, Range<usize>)>,
    /// Whether the entries arrived in strictly increasing key order.
    sorted: bool,
    /// The key passed to `serialize_key`, awaiting its value.
    pending_key: Option<String>,
    variant: Option<&'static str>,
}

impl<'a> MapSer<'a> {
    fn new(out: &'a mut Vec<u8>, variant: Option<&'static str>) -> Self {
        out.push(b'{');
        let body_start = out.len();
        Self { out, body_start, entries: Vec::new(), sorted: true, pending_key: None, variant }
    }

    fn wrap(&self, e: Error) -> Error {
        match self.variant {
            Some(v) => e.at(Step::Key(v.to_owned())),
            None => e,
        }
    }

    fn entry<T: Serialize + ?Sized>(&mut self, key: Cow<'static, str>, value: &T) -> Result<(), Error> {
        if !self.entries.is_empty() {
            self.out.push(b',');
        }
        let start = self.out.len();
        write_string(self.out, &key);
        self.out.push(b':');
        if let Err(e) = value.serialize(Ser { out: &mut *self.out }) {
            return Err(self.wrap(e.at(Step::Key(key.into_owned()))));
        }
        let key = ObjectKey::new(key);
        if let Some((last, _)) = self.entries.last() {
            self.sorted &= last.cmp(&key) == Ordering::Less;
        }
        self.entries.push((key, start..self.out.len()));
        Ok(())
    }

    fn finish(mut self) -> Result<(), Error> {
        if !self.sorted {
            self.entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            if let Some(pair) = self.entries.windows(2).find(|w| w[0].0.text == w[1].0.text) {
                let e = Error::new(CanonicalJsonErrorKind::DuplicateKey(pair[0].0.text.to_string()));
                return Err(self.wrap(e));
            }
            let body = self.out.split_off(self.body_start);
            for (i, (_, range)) in self.entries.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                let local = range.start - self.body_start..range.end - self.body_start;
                self.out.extend_from_slice(&body[local]);
            }
        }
        self.out.push(b'}');
        if self.variant.is_some() {
            self.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeMap for MapSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        match key.serialize(KeySer) {
            Ok(key) => {
                self.pending_key = Some(key);
                Ok(())
            }
            Err(e) => Err(self.wrap(e)),
        }
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self.pending_key.take().ok_or_else(|| ser::Error::custom("serialize_value before serialize_key"))?;
        self.entry(Cow::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeStruct for MapSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.entry(Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for MapSer<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.entry(Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Map keys: only things that serialize as strings.

struct KeySer;

fn not_a_string(what: &'static str) -> Error {
    Error::new(CanonicalJsonErrorKind::NonStringKey(what))
}

macro_rules! refuse_key {
    ($($method:ident($($ty:ty),*) => $what:literal;)*) => {
        $(fn $method(self, $(_: $ty),*) -> Result<String, Error> {
            Err(not_a_string($what))
        })*
    };
}

impl Serializer for KeySer {
    type Ok = String;
    type Error = Error;
    type SerializeSeq = ser::Impossible<String, Error>;
    type SerializeTuple = ser::Impossible<String, Error>;
    type SerializeTupleStruct = ser::Impossible<String, Error>;
    type SerializeTupleVariant = ser::Impossible<String, Error>;
    type SerializeMap = ser::Impossible<String, Error>;
    type SerializeStruct = ser::Impossible<String, Error>;
    type SerializeStructVariant = ser::Impossible<String, Error>;

    fn serialize_str(self, v: &str) -> Result<String, Error> {
        Ok(v.to_owned())
    }
    fn serialize_char(self, v: char) -> Result<String, Error> {
        Ok(v.to_string())
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<String, Error> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<String, Error> {
        value.serialize(self)
    }

    refuse_key! {
        serialize_bool(bool) => "a bool";
        serialize_i8(i8) => "an integer";
        serialize_i16(i16) => "an integer";
        serialize_i32(i32) => "an integer";
        serialize_i64(i64) => "an integer";
        serialize_i128(i128) => "an integer";
        serialize_u8(u8) => "an integer";
        serialize_u16(u16) => "an integer";
        serialize_u32(u32) => "an integer";
        serialize_u64(u64) => "an integer";
        serialize_u128(u128) => "an integer";
        serialize_f32(f32) => "a float";
        serialize_f64(f64) => "a float";
        serialize_bytes(&[u8]) => "bytes";
        serialize_none() => "None";
        serialize_unit() => "()";
        serialize_unit_struct(&'static str) => "a unit struct";
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, Error> {
        Err(not_a_string("an Option"))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, Error> {
        Err(not_a_string("an enum variant with data"))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(not_a_string("a sequence"))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        Err(not_a_string("a tuple"))
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeTupleStruct, Error> {
        Err(not_a_string("a tuple struct"))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(not_a_string("an enum variant with data"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(not_a_string("a map"))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct, Error> {
        Err(not_a_string("a struct"))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(not_a_string("an enum variant with data"))
    }
}
