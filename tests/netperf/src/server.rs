//! `tern-netperf server`: one thread per connection, the protocol in [`crate::protocol`].
//! Requests come from the network, so every size and duration is checked before use.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::protocol::{Mode, BUFFER_LEN, MAX_DURATION, MAX_ECHO_SIZE};
use crate::{Failure, OrFailed};

/// A connection silent for this long is given up (so an abandoned client costs a thread for a
/// while, not forever).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a connection ended well.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    Done,
    /// The client asked the server to exit.
    Stop,
}

/// Listen on `port` on every IPv4 address.
pub fn listen(port: u16) -> Result<TcpListener, Failure> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).or_failed(|| format!("listening on port {port}"))
}

/// Serve connections until one asks to stop; then the process exits with status 0.
pub fn serve(listener: TcpListener) -> Result<(), Failure> {
    let local = listener.local_addr().or_failed(|| "reading the listening address")?;
    println!("tern-netperf: listening on {local}");
    io::stdout().flush().or_failed(|| "writing to stdout")?;
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and the like: keep serving the connections that work.
                eprintln!("tern-netperf: accepting a connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream.peer_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
        let spawned = std::thread::Builder::new().name("conn".into()).spawn(move || match handle(stream) {
            Ok(Served::Done) => {}
            Ok(Served::Stop) => std::process::exit(0),
            Err(e) => eprintln!("tern-netperf: connection from {peer}: {e}"),
        });
        if let Err(e) = spawned {
            eprintln!("tern-netperf: starting a connection thread failed: {e}");
        }
    }
    Ok(())
}

/// Serve one connection.
pub fn handle(mut stream: TcpStream) -> Result<Served, Failure> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT)).or_failed(|| "setting a read timeout")?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT)).or_failed(|| "setting a write timeout")?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).or_failed(|| "reading the mode")?;
    let mode = Mode::from_byte(first[0])
        .ok_or_else(|| Failure::new("reading the mode", format!("unknown mode byte {:#04x}", first[0])))?;
    match mode {
        Mode::Sink => sink(&mut stream)?,
        Mode::Source => source(&mut stream)?,
        Mode::Echo => echo(&mut stream)?,
        Mode::Stop => {
            stream.write_all(&[Mode::Stop.byte()]).or_failed(|| "acknowledging stop")?;
            return Ok(Served::Stop);
        }
    }
    Ok(Served::Done)
}

fn sink(stream: &mut TcpStream) -> Result<(), Failure> {
    let mut buf = vec![0u8; BUFFER_LEN];
    let mut total: u64 = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::new("sink: reading", e)),
        }
    }
    stream.write_all(&total.to_le_bytes()).or_failed(|| "sink: sending the byte count")
}

fn source(stream: &mut TcpStream) -> Result<(), Failure> {
    let mut request = [0u8; 8];
    stream.read_exact(&mut request).or_failed(|| "source: reading the duration")?;
    let millis = u64::from_le_bytes(request);
    let duration = Duration::from_millis(millis);
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(Failure::new(
            "source",
            format!("duration {millis} ms is not in (0, {}] s", MAX_DURATION.as_secs()),
        ));
    }
    let buf = pattern(BUFFER_LEN);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        stream.write_all(&buf).or_failed(|| "source: writing")?;
    }
    stream.shutdown(Shutdown::Write).or_failed(|| "source: closing")
}

fn echo(stream: &mut TcpStream) -> Result<(), Failure> {
    stream.set_nodelay(true).or_failed(|| "echo: setting TCP_NODELAY")?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).or_failed(|| "echo: reading the size")?;
    let size = u32::from_le_bytes(request);
    if !(1..=MAX_ECHO_SIZE).contains(&size) {
        return Err(Failure::new("echo", format!("message size {size} is not in [1, {MAX_ECHO_SIZE}]")));
    }
    let mut buf = vec![0u8; size as usize];
    while read_message(stream, &mut buf).or_failed(|| "echo: reading")? {
        stream.write_all(&buf).or_failed(|| "echo: writing")?;
    }
    Ok(())
}

/// Fill `buf`; `false` on a clean end of stream before its first byte.
pub fn read_message(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("end of stream after {filled} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// `len` bytes that are not all zeros (so nothing on the path can shortcut them).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_message_tells_a_clean_end_from_a_short_message() {
        let mut buf = [0u8; 4];
        assert!(read_message(&mut &b"abcd"[..], &mut buf).expect("full"));
        assert_eq!(&buf, b"abcd");
        assert!(!read_message(&mut &b""[..], &mut buf).expect("clean end"));
        let err = read_message(&mut &b"ab"[..], &mut buf).expect_err("short");
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn unknown_modes_and_oversized_requests_fail_alone() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests: [&[u8]; 3] = [b"x", &[b'e', 0, 0, 0, 0x10], &[b'r', 0, 0, 0, 0, 0, 0, 0, 0]];
        for request in requests {
            let mut client = TcpStream::connect(addr).expect("connect");
            client.write_all(request).expect("write");
            let (conn, _) = listener.accept().expect("accept");
            assert!(handle(conn).is_err(), "{request:?} was served");
        }
    }
}
