//! The one client for Slipway's local control APIs: HTTP on a Unix socket, as the node agent
//! and the load balancer serve them (only users who can open the socket file can call). Every
//! request goes on a fresh connection as HTTP/1.0, so an answer, a streamed one too, ends when
//! the server closes the connection; a chunked body (an HTTP/1.1 server's choice) is decoded.
//!
//! Blocking on purpose: the CLI, the benchmarks and the test worlds call it from plain threads.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request waits for its answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Nothing listens on the socket (or it cannot be opened).
    #[error("nothing answers on {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("{method} {path} on {socket}: {source}")]
    Io {
        socket: PathBuf,
        method: String,
        path: String,
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("{method} {path} on {socket}: malformed answer")]
    Malformed {
        socket: PathBuf,
        method: String,
        path: String,
    },
}

/// An answer: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client of one local API socket.
#[derive(Debug, Clone)]
pub struct LocalClient {
    socket: PathBuf,
    /// None: wait as long as it takes (a followed stream).
    timeout: Option<Duration>,
}

impl LocalClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }

    /// The longest wait for an answer (and between lines of a stream).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No limit on the wait: for a followed stream, which may be silent for hours.
    pub fn without_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request with an optional JSON body and reads the whole answer, whatever its
    /// status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
    ) -> Result<Answer, LocalError> {
        let mut stream = self.send(method, path, json)?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| self.io(method, path, e))?;
        parse_answer(&raw).ok_or_else(|| self.malformed(method, path))
    }

    /// Sends a GET whose answer is a stream of lines (`?follow=true` endpoints): the status and
    /// an iterator over the body's lines, which ends when the server closes the connection.
    pub fn stream_lines(
        &self,
        path: &str,
    ) -> Result<(u16, std::io::Lines<BufReader<UnixStream>>), LocalError> {
        let stream = self.send("GET", path, None)?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .map_err(|e| self.io("GET", path, e))?;
        let status = status_code(&status_line).ok_or_else(|| self.malformed("GET", path))?;
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| self.io("GET", path, e))?;
            if n == 0 || line.trim().is_empty() {
                break;
            }
        }
        Ok((status, reader.lines()))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
    ) -> Result<UnixStream, LocalError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| LocalError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let io = |e| self.io(method, path, e);
        stream.set_read_timeout(self.timeout).map_err(io)?;
        stream.set_write_timeout(self.timeout).map_err(io)?;
        let body = json.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.0\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        Ok(stream)
    }

    fn io(&self, method: &str, path: &str, source: std::io::Error) -> LocalError {
        LocalError::Io {
            socket: self.socket.clone(),
            method: method.into(),
            path: path.into(),
            source,
        }
    }

    fn malformed(&self, method: &str, path: &str) -> LocalError {
        LocalError::Malformed {
            socket: self.socket.clone(),
            method: method.into(),
            path: path.into(),
        }
    }
}

fn status_code(status_line: &str) -> Option<u16> {
    let mut words = status_line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

/// Splits a raw HTTP answer into its status and body (a chunked body decoded).
fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = status_code(head.lines().next()?)?;
    let body = &raw[end + 4..];
    let chunked = head.lines().skip(1).any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some(Answer {
            status,
            body: body.to_vec(),
        });
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(Answer { status, body: out });
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers_and_refuses_garbage() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_answer(plain),
            Some(Answer {
                status: 200,
                body: b"{}".to_vec()
            })
        );
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_answer(chunked),
            Some(Answer {
                status: 404,
                body: b"abcde".to_vec()
            })
        );
        assert_eq!(parse_answer(b"garbage"), None);
        assert_eq!(parse_answer(b"SMTP 200\r\n\r\n"), None);
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"),
            None,
            "a truncated chunk"
        );
    }

    /// A one-shot server on a temporary socket: records the request, sends `answer`.
    fn serve_once(answer: &'static [u8]) -> (tempfile_dir::Dir, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile_dir::Dir::new();
        let listener = UnixListener::bind(dir.path().join("api.sock")).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // The request ends with its body, whose length the head declares.
            loop {
                let n = conn.read(&mut buf).expect("read");
                request.extend_from_slice(&buf[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + len {
                        break;
                    }
                }
                assert!(n > 0, "the client closed before sending its body");
            }
            conn.write_all(answer).expect("write");
            request
        });
        (dir, server)
    }

    #[test]
    fn a_request_carries_its_body_and_gets_the_answer() {
        let (dir, server) = serve_once(b"HTTP/1.0 201 Created\r\n\r\n{\"ok\":true}");
        let client = LocalClient::new(dir.path().join("api.sock"));
        let answer = client
            .request("PUT", "/v1/things", Some(br#"{"a":1}"#))
            .expect("answer");
        assert_eq!(answer.status, 201);
        assert!(answer.is_success());
        assert_eq!(answer.text(), "{\"ok\":true}");
        let request = String::from_utf8(server.join().expect("server")).expect("utf8");
        assert!(
            request.starts_with("PUT /v1/things HTTP/1.0\r\n"),
            "{request}"
        );
        assert!(request.contains("content-length: 7\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
    }

    #[test]
    fn a_stream_yields_lines_until_the_server_closes() {
        let (dir, server) = serve_once(b"HTTP/1.0 200 OK\r\nx: y\r\n\r\none\ntwo\n");
        let client = LocalClient::new(dir.path().join("api.sock"));
        let (status, lines) = client
            .stream_lines("/v1/flows?follow=true")
            .expect("stream");
        assert_eq!(status, 200);
        let lines: Vec<String> = lines.collect::<Result<_, _>>().expect("lines");
        assert_eq!(lines, ["one", "two"]);
        server.join().expect("server");
    }

    #[test]
    fn nothing_listening_names_the_socket() {
        let dir = tempfile_dir::Dir::new();
        let socket = dir.path().join("absent.sock");
        let err = LocalClient::new(&socket)
            .request("GET", "/v1/status", None)
            .expect_err("nothing listens");
        assert!(matches!(err, LocalError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }

    /// A temporary directory removed on drop (std only).
    mod tempfile_dir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "slipway-local-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).expect("temp dir");
                Self(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
