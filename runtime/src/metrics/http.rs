//! A minimal HTTP/1.1 server and client for the metrics endpoints: one `GET` per connection,
//! `Connection: close`, bodies sized up front.
//!
//! Both `tern monitor` and each shim serve a handful of read-only endpoints to local
//! scrapers; a full HTTP stack would add nothing but surface. What matters is that a bad or
//! slow client never blocks anything else: every connection is its own task, the request head
//! is capped at [`MAX_REQUEST_HEAD`] and must arrive within [`REQUEST_TIMEOUT`], the response
//! must be taken within [`RESPONSE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at
//! once (more wait in the kernel's accept queue).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Largest request head (request line + headers) accepted.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to read the response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest response body the client accepts.
pub const MAX_RESPONSE_BODY: usize = 64 << 20;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("request failed")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("response larger than {MAX_RESPONSE_BODY} bytes")]
    TooLarge,
}

/// A parsed request: only what the endpoints need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path, without the query.
    pub path: String,
    /// Decoded `key=value` pairs of the query string, in order.
    pub query: Vec<(String, String)>,
}

impl Request {
    /// The first value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with a body of `content_type`.
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status: 200, content_type, body: body.into() }
    }

    /// An error status with a one-line plain-text explanation.
    pub fn error(status: u16, message: &str) -> Self {
        Response { status, content_type: "text/plain; charset=utf-8", body: format!("{message}\n").into_bytes() }
    }
}

/// What serves the requests of one server.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, request: Request) -> Response;
}

/// Serve `listener` until the task is dropped or aborted.
pub async fn serve_unix(listener: UnixListener, handler: Arc<dyn Handler>) {
    serve(|| async { listener.accept().await.map(|(stream, _)| stream) }, handler, "metrics socket").await;
}

/// Serve `listener` (TCP) until the task is dropped or aborted.
pub async fn serve_tcp(listener: TcpListener, handler: Arc<dyn Handler>) {
    serve(|| async { listener.accept().await.map(|(stream, _)| stream) }, handler, "metrics TCP listener").await;
}

/// Serve the connections `accept` yields, at most [`MAX_CONNECTIONS`] at a time.
async fn serve<S, F, Fut>(accept: F, handler: Arc<dyn Handler>, what: &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        match accept().await {
            Ok(stream) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve_connection(stream, handler).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: read the head, answer, close.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, handler: Arc<dyn Handler>) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::error(408, "request head not received in time"),
        Ok(Err(HeadError::Io)) => return,
        Ok(Err(HeadError::TooLarge)) => Response::error(431, "request head too large"),
        Ok(Ok(head)) => match parse_request_line(&head) {
            Ok((method, request)) => {
                let head_only = method == "HEAD";
                let mut response = handler.handle(request).await;
                if head_only {
                    response.body.clear();
                }
                response
            }
            Err(status) => Response::error(status, "bad request"),
        },
    };
    let bytes = encode_response(&response);
    match tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "client went away"),
        Err(_) => tracing::debug!("client did not read the response in time"),
    }
}

enum HeadError {
    Io,
    TooLarge,
}

/// Read until the blank line that ends the head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return if head.is_empty() { Err(HeadError::Io) } else { Ok(head) };
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// `GET /path?query HTTP/1.1` → method and request; an HTTP status on failure.
fn parse_request_line(head: &[u8]) -> Result<(String, Request), u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let line = text.lines().next().ok_or(400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(505);
    }
    if method != "GET" && method != "HEAD" {
        return Err(405);
    }
    if !target.starts_with('/') {
        return Err(400);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok((method.to_owned(), Request { path: percent_decode(path), query }))
}

/// Decode `%XX` escapes and `+` (as space); invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn encode_response(r: &Response) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(&r.body);
    out
}

/// `GET target` over the unix socket at `socket`, all within `timeout`. Returns the status
/// and the body.
pub async fn get_unix(socket: &Path, target: &str, timeout: Duration) -> Result<(u16, Vec<u8>), HttpError> {
    let fut = async {
        let mut stream =
            UnixStream::connect(socket).await.map_err(|e| HttpError::Connect(socket.display().to_string(), e))?;
        let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream).take(MAX_RESPONSE_BODY as u64 + 1).read_to_end(&mut raw).await?;
        if raw.len() > MAX_RESPONSE_BODY {
            return Err(HttpError::TooLarge);
        }
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout(timeout))?
}

/// Status and body of a complete `Connection: close` response.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), HttpError> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(HttpError::Malformed("no end of head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let status_line = head.lines().next().ok_or(HttpError::Malformed("empty head"))?;
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let status = parts.next().and_then(|s| s.parse::<u16>().ok()).ok_or(HttpError::Malformed("bad status"))?;
    let mut body = raw[end + 4..].to_vec();
    let length = head.lines().skip(1).find_map(|h| {
        let (name, value) = h.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
    });
    if let Some(length) = length {
        if body.len() < length {
            return Err(HttpError::Malformed("body shorter than Content-Length"));
        }
        body.truncate(length);
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait::async_trait]
    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Response {
            match request.path.as_str() {
                "/echo" => Response::ok("text/plain", format!("{:?}", request.query)),
                _ => Response::error(404, "no such endpoint"),
            }
        }
    }

    #[test]
    fn request_lines() {
        let (m, r) = parse_request_line(b"GET /metrics?filter_family=tern_guest&x=a%20b+c HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(m, "GET");
        assert_eq!(r.path, "/metrics");
        assert_eq!(r.param("filter_family"), Some("tern_guest"));
        assert_eq!(r.param("x"), Some("a b c"));
        assert_eq!(parse_request_line(b"POST / HTTP/1.1\r\n\r\n").unwrap_err(), 405);
        assert_eq!(parse_request_line(b"GET / SPDY/3\r\n\r\n").unwrap_err(), 505);
        assert_eq!(parse_request_line(b"GET\r\n\r\n").unwrap_err(), 400);
        assert_eq!(parse_request_line(b"GET nopath HTTP/1.0\r\n\r\n").unwrap_err(), 400);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[tokio::test]
    async fn serves_over_a_unix_socket_and_survives_bad_clients() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_unix(listener, Arc::new(Echo)));

        // A client that connects and sends nothing must not block others.
        let _silent = UnixStream::connect(&sock).await.unwrap();
        // Garbage gets a 400.
        let mut bad = UnixStream::connect(&sock).await.unwrap();
        bad.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        bad.read_to_end(&mut raw).await.unwrap();
        assert_eq!(parse_response(&raw).unwrap().0, 400);
        // An endless head gets a 431.
        let mut big = UnixStream::connect(&sock).await.unwrap();
        let _ = big.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 2048]).await;
        let mut raw = Vec::new();
        // The server closes with our excess bytes unread, which may reset the connection
        // before the answer is read; either way it stopped reading.
        match big.read_to_end(&mut raw).await {
            Ok(_) => assert_eq!(parse_response(&raw).unwrap().0, 431),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }

        let (status, body) = get_unix(&sock, "/echo?a=1", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8(body).unwrap(), r#"[("a", "1")]"#);
        let (status, _) = get_unix(&sock, "/nope", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 404);
        server.abort();
    }

    #[tokio::test]
    async fn client_times_out_on_a_socket_nobody_answers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        // Bound and listening, but never accepted: connect succeeds, no answer ever comes.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let started = std::time::Instant::now();
        let err = get_unix(&sock, "/metrics", Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, HttpError::Timeout(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(_listener);
        // A socket file with no listener at all: connection refused, at once.
        let err = get_unix(&sock, "/metrics", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, HttpError::Connect(..)), "{err:?}");
    }
}
