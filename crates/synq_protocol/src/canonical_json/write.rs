//! Writing JSON primitives: strings, integers, floats, and the key order.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::{self, Write as _};

pub(super) fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A fixed stack buffer for number formatting.
struct StackBuf {
    buf: [u8; 48],
    len: usize,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

pub(super) fn write_display(out: &mut Vec<u8>, value: impl fmt::Display) {
    let mut buf = StackBuf { buf: [0; 48], len: 0 };
    if write!(buf, "{value}").is_ok() {
        out.extend_from_slice(&buf.buf[..buf.len]);
    } else {
        out.extend_from_slice(value.to_string().as_bytes());
    }
}

/// Writes a finite float the way ECMAScript's `Number.prototype.toString` does, from the
/// shortest round-trip scientific form that Rust's `{:e}` produces (`d[.ddd]e[-]x`).
pub(super) fn write_float(out: &mut Vec<u8>, value: impl fmt::LowerExp) {
    let mut buf = StackBuf { buf: [0; 48], len: 0 };
    // `{:e}` of a finite f32/f64 is at most ~25 bytes, so this cannot overflow the buffer.
    let _ = write!(buf, "{value:e}");
    let text = &buf.buf[..buf.len];
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let e_pos = text.iter().position(|&c| c == b'e').unwrap_or(text.len());
    let mantissa = &text[..e_pos];
    let exponent: i32 =
        std::str::from_utf8(text.get(e_pos + 1..).unwrap_or(b"0")).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut digits = [0u8; 24];
    let mut k = 0;
    for &c in mantissa.iter().filter(|c| c.is_ascii_digit()) {
        if k < digits.len() {
            digits[k] = c;
            k += 1;
        }
    }
    let digits = &digits[..k];
    if digits == b"0" {
        out.push(b'0'); // both zeros print as 0, as in JavaScript
        return;
    }
    if negative {
        out.push(b'-');
    }
    let k = k as i32;
    let n = exponent + 1; // the decimal point sits after `n` digits
    if k <= n && n <= 21 {
        out.extend_from_slice(digits);
        out.extend(std::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.extend_from_slice(&digits[..n as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-n) as usize));
        out.extend_from_slice(digits);
    } else {
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if n - 1 < 0 { b'-' } else { b'+' });
        write_display(out, (n - 1).unsigned_abs());
    }
}

/// UTF-16 code unit order, JavaScript's default string sort.
///
/// UTF-8 byte order is code point order, which differs from UTF-16 order only between a
/// character in U+E000–U+FFFF (lead byte 0xEE or 0xEF) and one above U+FFFF (lead byte ≥ 0xF0);
/// byte order is used unless the first differing bytes are both ≥ 0xEE.
pub(super) fn utf16_cmp(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    match x.iter().zip(y).position(|(p, q)| p != q) {
        None => x.len().cmp(&y.len()),
        Some(i) if x[i] >= 0xEE && y[i] >= 0xEE => a.encode_utf16().cmp(b.encode_utf16()),
        Some(i) => x[i].cmp(&y[i]),
    }
}

/// An object key with what its comparisons need to know in advance.
pub(super) struct ObjectKey {
    pub(super) text: Cow<'static, str>,
    /// Whether it has a byte ≥ 0xEE: only two such keys can order differently by bytes and by
    /// UTF-16 units (see [`utf16_cmp`]), so every other comparison is a plain `memcmp`.
    high: bool,
}

impl ObjectKey {
    pub(super) fn new(text: Cow<'static, str>) -> Self {
        let high = text.bytes().any(|b| b >= 0xEE);
        Self { text, high }
    }

    /// UTF-16 code unit order.
    pub(super) fn cmp(&self, other: &Self) -> Ordering {
        if self.high && other.high {
            utf16_cmp(&self.text, &other.text)
        } else {
            self.text.as_bytes().cmp(other.text.as_bytes())
        }
    }
}
