//! A small blocking HTTP/1.1 client for the Elasticsearch sink: one request per connection,
//! `http://` only, bounded response size.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Responses larger than this are refused (a `_bulk` answer for a batch is far smaller).
const RESPONSE_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                format!("{url:?}: https is not supported yet; use http:// (or a local TLS proxy)")
            } else {
                format!("{url:?}: give a URL like http://localhost:9200")
            }
        })?;
        let (hostport, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?),
            None => (hostport, 80),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
        Ok(Endpoint { host: host.to_string(), port, prefix })
    }

    /// Sends one request; returns the status and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        timeout: Duration,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let addr = format!("{}:{}", self.host, self.port);
        let mut stream = TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.prefix,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream.take(RESPONSE_MAX).read_to_end(&mut raw)?;
        parse_response(&raw).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed HTTP response")
        })
    }
}

fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let rest = body.get(i..)?;
        let line_end = rest.windows(2).position(|w| w == b"\r\n")? + i;
        let size_text = std::str::from_utf8(body.get(i..line_end)?).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            return Some((status, out));
        }
        let end = i.checked_add(size)?;
        out.extend_from_slice(body.get(i..end)?);
        i = end.checked_add(2)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_chunked_bodies() {
        let e = Endpoint::parse("http://es:9201/prefix/").expect("valid");
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("es", 9201, "/prefix"));
        assert!(Endpoint::parse("https://es:9200").expect_err("https").contains("not supported"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw), Some((200, b"Wikipedia".to_vec())));
        assert_eq!(
            parse_response(b"HTTP/1.1 429 Too Many\r\nContent-Length: 2\r\n\r\n{}"),
            Some((429, b"{}".to_vec()))
        );
        assert_eq!(parse_response(b"garbage"), None);
        // Cut short, or lying about chunk sizes: no panic, no answer.
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki"),
            None
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nx"
            ),
            None
        );
    }
}
