//! Backend node addresses in a shard map: `host:port`, or a libpq-style URL
//! `postgres://user:password@host:port/dbname?key=value` when a node needs its own
//! credentials, database or connection options.
//!
//! `Display` never shows the password, so a `NodeAddr` can go into logs, metrics labels
//! and `SHOW NODES` as is; the output parses back to the same node.

use std::fmt;
use std::str::FromStr;

/// libpq's default, used when an address leaves the port out.
pub const DEFAULT_PORT: u16 = 5432;

/// One PostgreSQL server: a shard's primary or one of its replicas.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
    /// Overrides the client's user name towards this node.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Overrides the map's `database` for this node.
    pub dbname: Option<String>,
    /// Query parameters in order, e.g. `("sslmode", "require")`.
    pub options: Vec<(String, String)>,
}

impl NodeAddr {
    /// Only host and port: what identifies the server, e.g. to spot a node listed twice.
    pub fn endpoint(&self) -> String {
        format_endpoint(&self.host, self.port)
    }
}

impl NodeAddr {
    /// libpq lets `user`, `password` and `dbname` come as query parameters too; they are
    /// moved into their fields so nobody has to look in two places (and so the password
    /// never reaches `Display` through `options`).
    fn set_option(&mut self, key: String, value: String) {
        match key.as_str() {
            "user" => self.user = non_empty(value),
            "password" => self.password = non_empty(value),
            "dbname" => self.dbname = non_empty(value),
            _ => self.options.push((key, value)),
        }
    }
}

impl fmt::Debug for NodeAddr {
    /// Same as `Display`, so a stray `{:?}` cannot leak the password either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeAddr({self})")
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = self.endpoint();
        if self.user.is_none() && self.dbname.is_none() && self.options.is_empty() {
            return f.write_str(&endpoint);
        }
        f.write_str("postgres://")?;
        if let Some(user) = &self.user {
            write!(f, "{}@", encode(user))?;
        }
        f.write_str(&endpoint)?;
        if let Some(db) = &self.dbname {
            write!(f, "/{}", encode(db))?;
        }
        for (i, (key, value)) in self.options.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{}={}", encode(key), encode(value))?;
        }
        Ok(())
    }
}

impl NodeAddr {
    /// The address as the map file writes it, password included (for writing the map
    /// back after a promotion; never for logs or the console, which use `Display`).
    pub fn to_map_text(&self) -> String {
        let shown = self.to_string();
        let Some(password) = &self.password else {
            return shown;
        };
        let user = self.user.as_deref().map(encode).unwrap_or_default();
        let mut out = format!("postgres://{user}:{}@{}", encode(password), self.endpoint());
        if let Some(db) = &self.dbname {
            out.push_str(&format!("/{}", encode(db)));
        }
        for (i, (key, value)) in self.options.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            out.push_str(&format!("{sep}{}={}", encode(key), encode(value)));
        }
        out
    }
}

impl FromStr for NodeAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<NodeAddr, String> {
        let text = text.trim();
        let url = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"));
        match url {
            Some(rest) => parse_url(rest),
            None if text.contains("://") => {
                Err("only postgres:// and postgresql:// URLs are supported".into())
            }
            None => {
                let (host, port) = parse_endpoint(text)?;
                Ok(NodeAddr {
                    host,
                    port,
                    user: None,
                    password: None,
                    dbname: None,
                    options: Vec::new(),
                })
            }
        }
    }
}

/// Everything after `postgres://`.
fn parse_url(rest: &str) -> Result<NodeAddr, String> {
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, dbname) = match before_query.split_once('/') {
        Some((authority, db)) if !db.is_empty() => (authority, Some(decode(db)?)),
        Some((authority, _)) => (authority, None),
        None => (before_query, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((user, password)) => (non_empty(decode(user)?), non_empty(decode(password)?)),
        None => (None, None),
    };
    let (host, port) = parse_endpoint(hostport)?;
    let mut node = NodeAddr {
        host,
        port,
        user,
        password,
        dbname,
        options: Vec::new(),
    };
    for (key, value) in query.map(parse_query).transpose()?.unwrap_or_default() {
        node.set_option(key, value);
    }
    Ok(node)
}

fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    let mut options = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("option \"{pair}\" needs a value (key=value)"))?;
        let key = decode(key)?;
        if key.is_empty() {
            return Err(format!("option \"{pair}\" has an empty name"));
        }
        options.push((key, decode(value)?));
    }
    Ok(options)
}

/// `host`, `host:port`, `[v6addr]` or `[v6addr]:port`.
fn parse_endpoint(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("missing `]` after IPv6 address")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected `:port` after `]`")?,
                ),
            ),
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    check_host(host)?;
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("invalid port \"{p}\": expected 1-65535")),
        },
    };
    Ok((host.to_string(), port))
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let bad = |c: char| c.is_whitespace() || c.is_control() || "/?#@[]\\\"'".contains(c);
    match host.chars().find(|c| bad(*c)) {
        Some(c) => Err(format!("invalid character {c:?} in host \"{host}\"")),
        None => Ok(()),
    }
}

fn format_endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// Percent-decoding of URL components (`%40` -> `@`); the result must be UTF-8.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoding in \"{text}\""))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("\"{text}\" does not decode to UTF-8"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so `Display` output
/// always parses back.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
