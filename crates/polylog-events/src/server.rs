//! The connection loop of Polylog's HTTP endpoints (the collector, the API): a thread per
//! connection, at most `connections_max` at once (the rest get a 503), until `stop` is set.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Decodes `%XX` and `+` in a URL component.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a request that must arrive by a deadline: each read waits at most the time left, so a
/// client sending a byte now and then cannot hold its connection (and its thread) longer.
pub struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    pub deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    pub fn new(stream: &'a TcpStream, within: Duration) -> DeadlineReader<'a> {
        DeadlineReader { stream, deadline: Instant::now() + within }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "past the deadline"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// Whether a read failed for lack of time (a slow or silent client).
pub fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

/// A connection slot, given back when dropped (however the handler ends).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes a JSON answer and ends the exchange (`Connection: close`).
pub fn respond(stream: &TcpStream, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    respond_bytes(stream, status, "application/json", &serde_json::to_vec(body).unwrap_or_default())
}

/// Writes an answer of any type and ends the exchange (`Connection: close`).
pub fn respond_bytes(
    stream: &TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    respond_with(stream, status, &[], content_type, body)
}

/// Writes an answer with headers of its own (`Location`, `Set-Cookie`, ...) and ends the
/// exchange (`Connection: close`).
pub fn respond_with(
    mut stream: &TcpStream,
    status: u16,
    headers: &[(&str, String)],
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// Serves connections with `handle` until `stop` is set.
pub fn serve(
    listener: TcpListener,
    stop: &AtomicBool,
    connections_max: usize,
    what: &str,
    handle: Arc<dyn Fn(&TcpStream) + Send + Sync>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if active.load(Ordering::SeqCst) >= connections_max {
                    let _ = respond(
                        &stream,
                        503,
                        &serde_json::json!({"error": "too many connections"}),
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let slot = Slot(Arc::clone(&active));
                let handle = Arc::clone(&handle);
                std::thread::spawn(move || {
                    let _slot = slot;
                    handle(&stream);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                // Out of file descriptors, say: wait and go on.
                tracing::warn!("{what}: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}
