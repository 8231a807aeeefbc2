//! Join links: `synq://host:port/<appId>/<name>#pw=<password>`.
//!
//! As in Croquet, the password travels only in the URL *fragment*, which browsers and HTTP
//! clients never send to a server; a link carrying it in the query (`?pw=`) is refused. The
//! session name and password are percent-encoded (everything but `A–Z a–z 0–9 - . _ ~`); the
//! app id needs no encoding. Other query parameters and other fragment keys are ignored, so later
//! versions can add some.
//!
//! ```
//! use synq_protocol::link::JoinLink;
//! let link: JoinLink = "synq://example.org:5800/io.example.game/lobby%201#pw=s3cret".parse().unwrap();
//! assert_eq!(link.name.as_str(), "lobby 1");
//! assert_eq!(link.password.as_deref(), Some("s3cret"));
//! assert_eq!(link.to_string(), "synq://example.org:5800/io.example.game/lobby%201#pw=s3cret");
//! ```

use crate::ids::{AppId, IdError, SessionName, base64url};
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The scheme of join links.
pub const SCHEME: &str = "synq://";

/// The port used when a link names none.
pub const DEFAULT_PORT: u16 = 5800;

/// What is wrong with a join link.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The link does not start with `synq://`.
    #[error("a join link starts with \"synq://\"")]
    Scheme,
    /// The host or port is missing or malformed.
    #[error("bad host or port in join link: {0}")]
    Host(String),
    /// The path is not `/<appId>/<name>`.
    #[error("a join link's path is /<appId>/<session name>: {0}")]
    Path(String),
    /// The app id or session name is invalid.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A `%` escape is malformed or does not decode to UTF-8.
    #[error("bad percent-encoding in join link: {0}")]
    Encoding(String),
    /// The password is in the query string, where it would be sent to servers and logged.
    #[error(
        "the password must be in the link's fragment (#pw=…), which is never sent to any server; \
         this link has it in the query (?pw=…), from where it would reach servers and their logs"
    )]
    PasswordInQuery,
    /// The fragment names the password twice.
    #[error("the join link's fragment has more than one pw=")]
    DuplicatePassword,
}

/// A parsed join link.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinLink {
    /// Host name or IP address of the reflector (an IPv6 address without brackets).
    pub host: String,
    /// Port of the reflector.
    pub port: u16,
    /// The app.
    pub app_id: AppId,
    /// The session.
    pub name: SessionName,
    /// The session password, if the link carries it.
    pub password: Option<String>,
}

impl fmt::Debug for JoinLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinLink")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("app_id", &self.app_id)
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Display for JoinLink {
    /// The link text, including the password (it is meant to be shared).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SCHEME)?;
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(f, ":{}/{}/{}", self.port, self.app_id, percent_encode(self.name.as_str()))?;
        if let Some(pw) = &self.password {
            write!(f, "#pw={}", percent_encode(pw))?;
        }
        Ok(())
    }
}

impl FromStr for JoinLink {
    type Err = LinkError;

    fn from_str(link: &str) -> Result<Self, LinkError> {
        JoinLink::parse(link)
    }
}

impl JoinLink {
    /// Parses a join link; the port defaults to [`DEFAULT_PORT`].
    pub fn parse(link: &str) -> Result<Self, LinkError> {
        let rest = link.trim().strip_prefix(SCHEME).ok_or(LinkError::Scheme)?;
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        if query.split('&').any(|p| matches!(p.split('=').next(), Some("pw" | "password"))) {
            return Err(LinkError::PasswordInQuery);
        }
        let (authority, path) = rest.split_once('/').ok_or(LinkError::Path("it is missing".into()))?;
        let (host, port) = parse_authority(authority)?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let (app, name) = path.split_once('/').ok_or(LinkError::Path(format!("{path:?} has no session name")))?;
        if name.contains('/') {
            return Err(LinkError::Path(format!("{path:?} has more than two parts (encode '/' in names as %2F)")));
        }
        let app_id = AppId::new(&percent_decode(app)?)?;
        let name = SessionName::new(&percent_decode(name)?)?;
        let mut password = None;
        for param in fragment.split('&').filter(|p| !p.is_empty()) {
            if let Some(value) = param.strip_prefix("pw=")
                && password.replace(percent_decode(value)?).is_some()
            {
                return Err(LinkError::DuplicatePassword);
            }
        }
        Ok(Self { host, port, app_id, name, password })
    }
}

fn parse_authority(authority: &str) -> Result<(String, u16), LinkError> {
    let bad = |why: &str| LinkError::Host(format!("{authority:?}: {why}"));
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        ip.parse::<Ipv6Addr>().map_err(|_| bad("not an IPv6 address inside [ ]"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("expected ':' after ']'"))?),
        };
        (ip, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !authority.starts_with('[') && !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(bad("a host name has only ASCII letters, digits, '-' and '.'"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => {
            p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port is not a number in 1..=65535"))?
        }
    };
    Ok((host.to_owned(), port))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> Result<String, LinkError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            let byte = byte.ok_or_else(|| LinkError::Encoding(format!("bad escape at byte {i} of {text:?}")))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| LinkError::Encoding(format!("{text:?} does not decode to UTF-8")))
}

fn random_base64url(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    OsRng.fill_bytes(&mut bytes);
    base64url(&bytes)
}

/// A random session password: 16 random bytes as base64url (22 characters), as Croquet's
/// `autoPassword`.
pub fn random_password() -> String {
    random_base64url(16)
}

/// A random session name: 10 random bytes as base64url (14 characters), as Croquet's
/// `autoSession`.
pub fn random_session_name() -> SessionName {
    // base64url text is 14 ASCII characters, always a valid name.
    SessionName::new(&random_base64url(10)).unwrap_or_else(|_| unreachable!("base64url is a valid session name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(host: &str, port: u16, name: &str, pw: Option<&str>) -> JoinLink {
        JoinLink {
            host: host.into(),
            port,
            app_id: AppId::new("io.example.game").unwrap(),
            name: SessionName::new(name).unwrap(),
            password: pw.map(Into::into),
        }
    }

    #[test]
    fn formats_and_parses_round_trip() {
        for l in [
            link("127.0.0.1", 5800, "lobby", Some("pw")),
            link("example.org", 1, "a b/c?d#e%f — ü 😀", Some("p w#&=?/%")),
            link("::1", 443, "x", None),
        ] {
            let text = l.to_string();
            assert_eq!(JoinLink::parse(&text).unwrap(), l, "{text}");
        }
        assert_eq!(link("h", 1, "a b", Some("x")).to_string(), "synq://h:1/io.example.game/a%20b#pw=x");
        assert_eq!(link("::1", 2, "n", None).to_string(), "synq://[::1]:2/io.example.game/n");
    }

    #[test]
    fn defaults_and_tolerance() {
        let l = JoinLink::parse("synq://host/io.example.game/n/?debug=1#x=1&pw=abc").unwrap();
        assert_eq!((l.port, l.password.as_deref()), (DEFAULT_PORT, Some("abc")));
        assert!(format!("{l:?}").contains("<redacted>") && !format!("{l:?}").contains("abc"));
    }

    #[test]
    fn password_in_query_is_refused() {
        let err = JoinLink::parse("synq://h:1/io.example.game/n?pw=secret").unwrap_err();
        assert_eq!(err, LinkError::PasswordInQuery);
        assert!(err.to_string().contains("fragment (#pw=…)"));
        assert_eq!(JoinLink::parse("synq://h:1/io.example.game/n?a=1&password=x"), Err(LinkError::PasswordInQuery));
    }

    #[test]
    fn malformed_links_are_refused_clearly() {
        let cases: &[(&str, &str)] = &[
            ("https://h/io.example.game/n", "starts with \"synq://\""),
            ("synq://", "path"),
            ("synq://h:1", "path"),
            ("synq://h:1/io.example.game", "no session name"),
            ("synq://h:1/io.example.game/", "session name"),
            ("synq://h:1/io.example.game/a/b", "more than two parts"),
            ("synq://h:0/io.example.game/n", "port"),
            ("synq://h:99999/io.example.game/n", "port"),
            ("synq://h:x/io.example.game/n", "port"),
            ("synq://:1/io.example.game/n", "no host"),
            ("synq://h_st:1/io.example.game/n", "host name"),
            ("synq://[::1/io.example.game/n", "unclosed"),
            ("synq://[zz]:1/io.example.game/n", "IPv6"),
            ("synq://h:1/game/n", "invalid app id"),
            ("synq://h:1/io.example.game/%zz", "bad escape"),
            ("synq://h:1/io.example.game/%", "bad escape"),
            ("synq://h:1/io.example.game/%ff", "UTF-8"),
            ("synq://h:1/io.example.game/%0A", "control character"),
            ("synq://h:1/io.example.game/n#pw=a&pw=b", "more than one pw="),
        ];
        for (text, why) in cases {
            let err = JoinLink::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn random_helpers() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert_eq!(random_session_name().as_str().len(), 14);
    }
}
