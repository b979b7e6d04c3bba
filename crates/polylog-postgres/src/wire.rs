//! A blocking client of the Postgres frontend/backend protocol (version 3.0): connection
//! start-up and authentication (trust, cleartext, MD5, SCRAM-SHA-256), simple queries,
//! `COPY ... TO STDOUT`, and the streaming replication sub-protocol (`CopyBoth`).
//!
//! Only what change data capture needs; every message read is bounded by
//! [`MESSAGE_BYTES_MAX`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Largest protocol message accepted from the server (a row, a WAL chunk).
pub const MESSAGE_BYTES_MAX: usize = 1 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Errors talking to Postgres. `Server` carries the server's own words and SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid connection URL: {0}")]
    Url(String),
    #[error("cannot connect to Postgres at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection to Postgres lost: {0}")]
    Io(#[from] io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{severity} {code}: {message}{}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default(), hint.as_ref().map(|h| format!(". Hint: {h}")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<Box<str>>,
        hint: Option<Box<str>>,
        /// Where it happened (`COPY t, line 3, column x: "..."`); not part of the message.
        context: Option<Box<str>>,
    },
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl PgError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
    /// Whether trying again later may succeed (network trouble, server starting or shutting
    /// down), as opposed to a problem a person must fix (bad password, missing privilege).
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::Io(_) => true,
            // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 53300 too
            // many connections, 08xxx connection exceptions, 55006 object in use (slot busy).
            PgError::Server { code, .. } => {
                code.starts_with("08")
                    || ["57P01", "57P02", "57P03", "53300", "55006"].contains(&code.as_str())
            }
            _ => false,
        }
    }
}

/// How to use TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where and as whom to connect, parsed from a `postgres://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// CA certificates (PEM) to verify the server with (`verify-ca`, `verify-full`).
    pub sslrootcert: Option<std::path::PathBuf>,
    pub application_name: String,
}

impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "postgres://{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

fn percent_decode(s: &str) -> Result<String, PgError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex =
                s.get(i + 1..i + 3).ok_or_else(|| PgError::Url(format!("bad escape in {s:?}")))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| PgError::Url(format!("bad escape in {s:?}")))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgError::Url(format!("{s:?} is not UTF-8 once decoded")))
}

impl ConnectParams {
    /// Parses `postgres[ql]://[user[:password]@]host[:port][/dbname][?sslmode=...&application_name=...]`.
    /// The password may also come from `PGPASSWORD`.
    pub fn parse(url: &str) -> Result<ConnectParams, PgError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| PgError::Url("it must start with postgres://".into()))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (percent_decode(u)?, Some(percent_decode(p)?)),
                None => (percent_decode(u)?, None),
            },
            None => (String::new(), None),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) =
                h.split_once(']').ok_or_else(|| PgError::Url("unclosed [ in host".into()))?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            }
        };
        let port = if port.is_empty() {
            5432
        } else {
            port.parse().map_err(|_| PgError::Url(format!("port {port:?} is not a number")))?
        };
        let mut p = ConnectParams {
            host: if host.is_empty() { "localhost".into() } else { percent_decode(&host)? },
            port,
            user: if user.is_empty() {
                std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into())
            } else {
                user
            },
            password: password.or_else(|| std::env::var("PGPASSWORD").ok()),
            dbname: String::new(),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: "polylog".into(),
        };
        p.dbname = if path.is_empty() { p.user.clone() } else { percent_decode(path)? };
        for pair in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            match k {
                "sslmode" => {
                    p.sslmode = match v.as_str() {
                        "disable" | "allow" => SslMode::Disable,
                        "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(PgError::Url(format!("unknown sslmode {other:?}"))),
                    }
                }
                "application_name" => p.application_name = v,
                "sslrootcert" => p.sslrootcert = Some(v.into()),
                "user" => p.user = v,
                "password" => p.password = Some(v),
                "host" => p.host = v,
                "port" => {
                    p.port = v
                        .parse()
                        .map_err(|_| PgError::Url(format!("port {v:?} is not a number")))?
                }
                "dbname" => p.dbname = v,
                other => return Err(PgError::Url(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(p)
    }
}

/// The connection's byte stream: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// Asks the server for TLS (`SSLRequest`) and, if it agrees, completes the handshake.
fn negotiate_tls(mut sock: TcpStream, p: &ConnectParams) -> Result<Stream, PgError> {
    if p.sslmode == SslMode::Disable {
        return Ok(Stream::Plain(sock));
    }
    sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer)?;
    match answer[0] {
        b'S' => {}
        b'N' if p.sslmode == SslMode::Prefer => return Ok(Stream::Plain(sock)),
        b'N' => {
            return Err(PgError::Tls(format!(
                "the server does not accept TLS connections, and sslmode={:?} requires TLS",
                p.sslmode
            )))
        }
        other => return Err(PgError::Protocol(format!("answer {other:#x} to the TLS request"))),
    }
    let config = crate::tls::client_config(p.sslmode, p.sslrootcert.as_ref())?;
    let mut conn = rustls::ClientConnection::new(config, crate::tls::server_name(&p.host)?)
        .map_err(|e| PgError::Tls(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| {
            // A rustls error (a certificate that does not verify, say) comes wrapped in io.
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(tls) => {
                    PgError::Tls(format!("handshake with {}:{} failed: {tls}", p.host, p.port))
                }
                None => PgError::Io(e),
            }
        })?;
    }
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
}

/// A row of a simple query, in text format.
pub type Row = Vec<Option<String>>;

/// One connection. Not thread-safe; one per task.
pub struct Connection {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    /// Server parameters reported at start-up (`server_version`, ...).
    pub params: HashMap<String, String>,
    /// Notices the server sent (warnings), oldest first; bounded.
    pub notices: Vec<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.stream.tcp().peer_addr().ok())
            .finish_non_exhaustive()
    }
}

/// A message from the server: its type byte and body.
struct Msg {
    kind: u8,
    body: Vec<u8>,
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(b: &'a [u8]) -> Self {
        Parser { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], PgError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| PgError::Protocol("message shorter than its fields".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, PgError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, PgError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, PgError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, PgError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn cstr(&mut self) -> Result<String, PgError> {
        let rest = &self.b[self.at..];
        let n = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| PgError::Protocol("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
}

fn server_error(body: &[u8]) -> PgError {
    let mut fields: HashMap<u8, String> = HashMap::new();
    let mut p = Parser::new(body);
    while let Ok(t) = p.u8() {
        if t == 0 {
            break;
        }
        match p.cstr() {
            Ok(v) => {
                fields.insert(t, v);
            }
            Err(_) => break,
        }
    }
    PgError::Server {
        severity: fields
            .remove(&b'V')
            .or_else(|| fields.remove(&b'S'))
            .unwrap_or_else(|| "ERROR".into()),
        code: fields.remove(&b'C').unwrap_or_default(),
        message: fields.remove(&b'M').unwrap_or_default(),
        detail: fields.remove(&b'D').map(String::into_boxed_str),
        hint: fields.remove(&b'H').map(String::into_boxed_str),
        context: fields.remove(&b'W').map(String::into_boxed_str),
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(kind);
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

impl Connection {
    /// Connects and authenticates. With `replication`, the connection speaks the replication
    /// sub-protocol (`replication=database`).
    pub fn connect(p: &ConnectParams, replication: bool) -> Result<Connection, PgError> {
        let addr = format!("{}:{}", p.host, p.port);
        let connect_err = |source| PgError::Connect { addr: addr.clone(), source };
        let addrs: Vec<_> = addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| connect_err(last))?;
        stream.set_nodelay(true).map_err(PgError::Io)?;
        // A peer that stops reading must not block us forever.
        stream.set_write_timeout(Some(Duration::from_secs(120))).map_err(PgError::Io)?;
        let stream = negotiate_tls(stream, p)?;
        let mut c = Connection {
            stream,
            buf: Vec::new(),
            start: 0,
            params: HashMap::new(),
            notices: Vec::new(),
        };
        let mut startup = Vec::new();
        startup.extend_from_slice(&196_608i32.to_be_bytes());
        let mut kv = vec![
            ("user", p.user.as_str()),
            ("database", p.dbname.as_str()),
            ("application_name", p.application_name.as_str()),
            // Backslashes in string literals are plain characters (our quoting relies on it).
            ("standard_conforming_strings", "on"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, YMD"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ];
        if replication {
            kv.push(("replication", "database"));
        }
        for (k, v) in kv {
            startup.extend_from_slice(k.as_bytes());
            startup.push(0);
            startup.extend_from_slice(v.as_bytes());
            startup.push(0);
        }
        startup.push(0);
        let mut msg = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&startup);
        c.stream.write_all(&msg)?;
        c.authenticate(p)?;
        loop {
            let m =
                c.read_msg(None)?.ok_or_else(|| PgError::Protocol("timeout in start-up".into()))?;
            match m.kind {
                b'Z' => return Ok(c),
                b'E' => return Err(server_error(&m.body)),
                _ => c.background(&m)?,
            }
        }
    }

    fn authenticate(&mut self, p: &ConnectParams) -> Result<(), PgError> {
        let password = || {
            p.password.clone().ok_or_else(|| {
                PgError::Auth(format!(
                    "the server asks user {:?} for a password; put it in the URL or PGPASSWORD",
                    p.user
                ))
            })
        };
        let mut scram: Option<Scram> = None;
        loop {
            let m = self
                .read_msg(None)?
                .ok_or_else(|| PgError::Protocol("timeout in authentication".into()))?;
            match m.kind {
                b'E' => {
                    let e = server_error(&m.body);
                    if e.code() == Some("28P01") || e.code() == Some("28000") {
                        return Err(PgError::Auth(e.to_string()));
                    }
                    return Err(e);
                }
                b'R' => {}
                _ => {
                    return Err(PgError::Protocol(format!(
                        "message {:?} during authentication",
                        m.kind as char
                    )))
                }
            }
            let mut r = Parser::new(&m.body);
            match r.i32()? {
                0 => return Ok(()),
                3 => {
                    let mut body = password()?.into_bytes();
                    body.push(0);
                    self.stream.write_all(&frame(b'p', &body))?;
                }
                5 => {
                    let salt = r.take(4)?;
                    let pw = password()?;
                    let inner = hex(&md5::Md5::digest(format!("{pw}{}", p.user).as_bytes()));
                    let mut h = md5::Md5::new();
                    h.update(inner.as_bytes());
                    h.update(salt);
                    let mut body = format!("md5{}", hex(&h.finalize())).into_bytes();
                    body.push(0);
                    self.stream.write_all(&frame(b'p', &body))?;
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let s = r.cstr()?;
                        if s.is_empty() {
                            break;
                        }
                        mechanisms.push(s);
                    }
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(PgError::Auth(format!(
                            "no supported SASL mechanism among {mechanisms:?}"
                        )));
                    }
                    let s = Scram::new(password()?);
                    let first = s.client_first();
                    let mut body = b"SCRAM-SHA-256\0".to_vec();
                    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    body.extend_from_slice(first.as_bytes());
                    self.stream.write_all(&frame(b'p', &body))?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::Protocol("SASL continue before start".into()))?;
                    let reply = s.client_final(r.rest())?;
                    self.stream.write_all(&frame(b'p', reply.as_bytes()))?;
                }
                12 => {
                    let s = scram
                        .as_ref()
                        .ok_or_else(|| PgError::Protocol("SASL final before start".into()))?;
                    s.verify_server(r.rest())?;
                }
                other => {
                    return Err(PgError::Auth(format!("unsupported authentication method {other}")))
                }
            }
        }
    }

    /// Handles messages that can arrive at any time.
    fn background(&mut self, m: &Msg) -> Result<(), PgError> {
        match m.kind {
            b'S' => {
                let mut p = Parser::new(&m.body);
                let k = p.cstr()?;
                let v = p.cstr()?;
                self.params.insert(k, v);
            }
            b'N' => {
                if self.notices.len() < 100 {
                    self.notices.push(server_error(&m.body).to_string());
                }
            }
            b'K' | b'A' => {}
            other => {
                return Err(PgError::Protocol(format!("unexpected message {:?}", other as char)))
            }
        }
        Ok(())
    }

    /// Reads one message; `None` if `deadline` passes first (no bytes are lost: a partial
    /// message stays buffered).
    fn read_msg(&mut self, deadline: Option<Instant>) -> Result<Option<Msg>, PgError> {
        Ok(self
            .next_frame(deadline)?
            .map(|(kind, body)| Msg { kind, body: self.buf[body].to_vec() }))
    }

    /// Reads one message and returns its type and where its body is in the buffer (valid until
    /// the next read), without copying it.
    fn next_frame(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(u8, std::ops::Range<usize>)>, PgError> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() >= 5 {
                let len = i32::from_be_bytes([avail[1], avail[2], avail[3], avail[4]]);
                let len = usize::try_from(len).ok().filter(|l| (4..=MESSAGE_BYTES_MAX).contains(l));
                let len = len.ok_or_else(|| PgError::Protocol("bad message length".into()))?;
                if avail.len() > len {
                    let kind = avail[0];
                    let body = self.start + 5..self.start + 1 + len;
                    self.start += 1 + len;
                    return Ok(Some((kind, body)));
                }
            }
            if self.start > 0 && self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            } else if self.start > READ_CHUNK_BYTES {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream.tcp().set_read_timeout(timeout)?;
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK_BYTES, 0);
            match self.stream.read(&mut self.buf[old..]) {
                Ok(0) => {
                    self.buf.truncate(old);
                    return Err(PgError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    )));
                }
                Ok(n) => self.buf.truncate(old + n),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    self.buf.truncate(old);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.buf.truncate(old),
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(PgError::Io(e));
                }
            }
        }
    }

    fn read_required(&mut self) -> Result<Msg, PgError> {
        self.read_msg(None)?.ok_or_else(|| PgError::Protocol("timed out".into()))
    }

    /// Runs one or more statements and returns the rows of all of them, as text.
    pub fn query(&mut self, sql: &str) -> Result<Vec<Row>, PgError> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.stream.write_all(&frame(b'Q', &body))?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.read_required()?;
            match m.kind {
                b'T' | b'C' | b'I' => {}
                b'D' => rows.push(parse_data_row(&m.body)?),
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                b'H' | b'G' | b'W' => {
                    return Err(PgError::Protocol("COPY in a plain query; use copy_out".into()))
                }
                _ => self.background(&m)?,
            }
        }
    }

    /// Runs one statement with parameters (`$1`, `$2`, ... in text form) through the extended
    /// protocol: large values are not parsed as SQL. Returns its rows, as text.
    pub fn query_params(&mut self, sql: &str, params: &[&[u8]]) -> Result<Vec<Row>, PgError> {
        let mut out =
            Vec::with_capacity(sql.len() + params.iter().map(|p| p.len() + 4).sum::<usize>() + 64);
        let mut parse = vec![0]; // the unnamed statement
        parse.extend_from_slice(sql.as_bytes());
        parse.push(0);
        parse.extend_from_slice(&0i16.to_be_bytes()); // parameter types: inferred
        out.extend_from_slice(&frame(b'P', &parse));
        let mut bind = vec![0, 0]; // the unnamed portal, of the unnamed statement
        bind.extend_from_slice(&0i16.to_be_bytes()); // every parameter in text form
        bind.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            bind.extend_from_slice(&(p.len() as i32).to_be_bytes());
            bind.extend_from_slice(p);
        }
        bind.extend_from_slice(&0i16.to_be_bytes()); // results in text form
        out.extend_from_slice(&frame(b'B', &bind));
        let mut execute = vec![0];
        execute.extend_from_slice(&0i32.to_be_bytes()); // every row
        out.extend_from_slice(&frame(b'E', &execute));
        out.extend_from_slice(&frame(b'S', &[]));
        self.stream.write_all(&out)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.read_required()?;
            match m.kind {
                b'1' | b'2' | b'C' | b'n' | b's' | b'T' | b'I' => {}
                b'D' => rows.push(parse_data_row(&m.body)?),
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => self.background(&m)?,
            }
        }
    }

    /// Runs statements whose result is not needed.
    pub fn execute(&mut self, sql: &str) -> Result<(), PgError> {
        self.query(sql).map(|_| ())
    }

    /// Runs `COPY ... TO STDOUT` and hands each data message (one row in text format) to `f`.
    /// Returns the number of rows.
    pub fn copy_out<E: From<PgError>>(
        &mut self,
        sql: &str,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.stream.write_all(&frame(b'Q', &body)).map_err(PgError::Io)?;
        let mut rows = 0;
        let mut error: Option<PgError> = None;
        let mut failed: Option<E> = None;
        loop {
            // Rows are handed over straight from the read buffer.
            let Some((kind, body)) = self.next_frame(None)? else { continue };
            if kind == b'd' {
                if failed.is_none() && error.is_none() {
                    rows += 1;
                    if let Err(e) = f(&self.buf[body]) {
                        failed = Some(e); // keep reading to the end so the connection stays usable
                    }
                }
                continue;
            }
            let m = Msg { kind, body: self.buf[body].to_vec() };
            match m.kind {
                b'H' | b'c' | b'C' | b'T' => {}
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => {
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    return error.map_or(Ok(rows), |e| Err(e.into()));
                }
                _ => self.background(&m)?,
            }
        }
    }

    /// Starts `COPY ... FROM STDIN`: afterwards send the data with [`Connection::copy_in_send`]
    /// and end it with [`Connection::copy_in_finish`].
    pub fn copy_in_start(&mut self, sql: &str) -> Result<(), PgError> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.stream.write_all(&frame(b'Q', &body))?;
        let mut error = None;
        loop {
            let m = self.read_required()?;
            match m.kind {
                b'G' => return Ok(()),
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => {
                    return Err(error.unwrap_or_else(|| {
                        PgError::Protocol("the statement did not start a COPY FROM STDIN".into())
                    }))
                }
                b'T' | b'C' | b'D' | b'I' => {}
                _ => self.background(&m)?,
            }
        }
    }

    /// Sends COPY data (any split: messages need not align with rows). A server error while
    /// sending is reported by [`Connection::copy_in_finish`]; the server drops the rest.
    pub fn copy_in_send(&mut self, data: &[u8]) -> Result<(), PgError> {
        for piece in data.chunks(MESSAGE_BYTES_MAX / 2) {
            let mut head = [b'd', 0, 0, 0, 0];
            head[1..].copy_from_slice(&((piece.len() + 4) as i32).to_be_bytes());
            self.stream.write_all(&head)?;
            self.stream.write_all(piece)?;
        }
        Ok(())
    }

    /// Ends the COPY data; returns the number of rows the server stored, or its error.
    pub fn copy_in_finish(&mut self) -> Result<u64, PgError> {
        self.stream.write_all(&frame(b'c', &[]))?;
        let mut error = None;
        let mut rows = 0;
        loop {
            let m = self.read_required()?;
            match m.kind {
                b'C' => {
                    let tag = String::from_utf8_lossy(&m.body);
                    rows = tag
                        .trim_end_matches('\0')
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => self.background(&m)?,
            }
        }
    }

    /// Starts streaming replication (`START_REPLICATION ...`); the connection becomes a
    /// replication stream.
    pub fn start_replication(mut self, command: &str) -> Result<ReplicationStream, PgError> {
        let mut body = command.as_bytes().to_vec();
        body.push(0);
        self.stream.write_all(&frame(b'Q', &body))?;
        loop {
            let m = self.read_required()?;
            match m.kind {
                b'W' => return Ok(ReplicationStream { conn: self }),
                b'E' => {
                    let e = server_error(&m.body);
                    // Drain to ReadyForQuery so the error is complete; ignore what follows.
                    return Err(e);
                }
                _ => self.background(&m)?,
            }
        }
    }
}

fn parse_data_row(body: &[u8]) -> Result<Row, PgError> {
    let mut p = Parser::new(body);
    let n = p.i16()?;
    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(body.len()));
    for _ in 0..n {
        let len = p.i32()?;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(String::from_utf8_lossy(p.take(len as usize)?).into_owned()));
        }
    }
    Ok(row)
}

/// What the server sends on a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// A chunk of decoded WAL: one pgoutput message.
    XLogData { wal_start: u64, wal_end: u64, server_time_us: i64, data: Vec<u8> },
    /// The server's position; answer at once when `reply_requested`.
    Keepalive { wal_end: u64, server_time_us: i64, reply_requested: bool },
}

/// A connection in replication mode.
#[derive(Debug)]
pub struct ReplicationStream {
    conn: Connection,
}

/// Microseconds between the Unix epoch and Postgres's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

fn now_pg_us() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_micros() as i64 - PG_EPOCH_OFFSET_US
}

impl ReplicationStream {
    /// The next message, or `None` if none arrives within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<ReplicationMessage>, PgError> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(m) = self.conn.read_msg(Some(deadline))? else { return Ok(None) };
            match m.kind {
                b'd' => {
                    let mut p = Parser::new(&m.body);
                    return match p.u8()? {
                        b'w' => {
                            let wal_start = p.i64()? as u64;
                            let wal_end = p.i64()? as u64;
                            let server_time_us = p.i64()?;
                            Ok(Some(ReplicationMessage::XLogData {
                                wal_start,
                                wal_end,
                                server_time_us,
                                data: p.rest().to_vec(),
                            }))
                        }
                        b'k' => {
                            let wal_end = p.i64()? as u64;
                            let server_time_us = p.i64()?;
                            let reply_requested = p.u8()? == 1;
                            Ok(Some(ReplicationMessage::Keepalive {
                                wal_end,
                                server_time_us,
                                reply_requested,
                            }))
                        }
                        other => Err(PgError::Protocol(format!(
                            "replication message {:?}",
                            other as char
                        ))),
                    };
                }
                b'E' => return Err(server_error(&m.body)),
                // The server ends replication when it shuts down: reconnect later.
                b'c' | b'C' | b'Z' => {
                    return Err(PgError::Io(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server ended replication (shutting down?)",
                    )))
                }
                _ => self.conn.background(&m)?,
            }
        }
    }

    /// Tells the server how far we have written, flushed (made durable) and applied. The slot's
    /// `confirmed_flush_lsn` follows `flushed`: WAL before it may be recycled.
    pub fn send_status(
        &mut self,
        written: u64,
        flushed: u64,
        applied: u64,
        reply: bool,
    ) -> Result<(), PgError> {
        let mut b = vec![b'r'];
        b.extend_from_slice(&written.to_be_bytes());
        b.extend_from_slice(&flushed.to_be_bytes());
        b.extend_from_slice(&applied.to_be_bytes());
        b.extend_from_slice(&now_pg_us().to_be_bytes());
        b.push(u8::from(reply));
        self.conn.stream.write_all(&frame(b'd', &b))?;
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> Result<[u8; 32], PgError> {
    let mut m = HmacSha256::new_from_slice(key).map_err(|e| PgError::Auth(e.to_string()))?;
    m.update(msg);
    Ok(m.finalize().into_bytes().into())
}

/// SCRAM-SHA-256 (RFC 7677) as Postgres uses it, without channel binding.
struct Scram {
    password: String,
    nonce: String,
    client_first_bare: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl Scram {
    fn new(password: String) -> Scram {
        let mut seed = Vec::new();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        seed.extend_from_slice(&now.as_nanos().to_le_bytes());
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        let mut urandom = [0u8; 18];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut urandom);
        }
        seed.extend_from_slice(&urandom);
        let nonce = base64::engine::general_purpose::STANDARD.encode(&Sha256::digest(&seed)[..18]);
        let client_first_bare = format!("n=,r={nonce}");
        Scram { password, nonce, client_first_bare, expected_server_signature: None }
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    fn client_final(&mut self, server_first: &[u8]) -> Result<String, PgError> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| PgError::Auth("bad SCRAM message".into()))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v.to_string()),
                Some(("s=", v)) => salt = base64::engine::general_purpose::STANDARD.decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(PgError::Auth("incomplete SCRAM server-first message".into()));
        };
        if !nonce.starts_with(&self.nonce) || iterations == 0 || iterations > 10_000_000 {
            return Err(PgError::Auth("the server's SCRAM reply does not match ours".into()));
        }
        // Hi(password, salt, i) = PBKDF2-HMAC-SHA-256 with one block.
        let mut block = salt.clone();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(self.password.as_bytes(), &block)?;
        let mut salted = u;
        for _ in 1..iterations {
            u = hmac(self.password.as_bytes(), &u)?;
            for (s, x) in salted.iter_mut().zip(u.iter()) {
                *s ^= x;
            }
        }
        let client_key = hmac(&salted, b"Client Key")?;
        let stored_key = Sha256::digest(client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes())?;
        let proof: Vec<u8> = client_key.iter().zip(signature.iter()).map(|(a, b)| a ^ b).collect();
        let server_key = hmac(&salted, b"Server Key")?;
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes())?);
        Ok(format!("{without_proof},p={}", base64::engine::general_purpose::STANDARD.encode(proof)))
    }

    fn verify_server(&self, server_final: &[u8]) -> Result<(), PgError> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| PgError::Auth("bad SCRAM message".into()))?;
        let sig = text
            .strip_prefix("v=")
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
        match (sig, self.expected_server_signature) {
            (Some(got), Some(want)) if got == want => Ok(()),
            _ => Err(PgError::Auth(
                "the server's SCRAM signature is wrong: not the server we expect".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: &str) {
        match ConnectParams::parse(url) {
            Ok(p) => assert_eq!(
                format!("{p:?} pw={:?} ssl={:?} app={}", p.password, p.sslmode, p.application_name),
                expected,
                "{url}"
            ),
            Err(e) => assert_eq!(format!("error: {e}"), expected, "{url}"),
        }
    }

    #[test]
    fn urls_parse() {
        check(
            "postgres://app:s%40cret@db.example:6543/shop?sslmode=disable",
            "postgres://app@db.example:6543/shop pw=Some(\"s@cret\") ssl=Disable app=polylog",
        );
        check("postgresql://u@[::1]/d", "postgres://u@::1:5432/d pw=None ssl=Prefer app=polylog");
        check("postgres://u@h:x/d", "error: invalid connection URL: port \"x\" is not a number");
        check("mysql://u@h/d", "error: invalid connection URL: it must start with postgres://");
        check(
            "postgres://u@h/d?sslmode=sometimes",
            "error: invalid connection URL: unknown sslmode \"sometimes\"",
        );
        check(
            "postgres://u@h/d?application_name=x&foo=1",
            "error: invalid connection URL: unknown parameter \"foo\"",
        );
    }
}
