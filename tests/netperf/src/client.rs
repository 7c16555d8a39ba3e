//! `tern-netperf client`: the tests, each timed on the side where the data arrives.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::args::Target;
use crate::protocol::{Mode, BUFFER_LEN};
use crate::server::{pattern, read_message};
use crate::stats::{Latency, Throughput};
use crate::{Failure, OrFailed};

/// Longest a single read or write may block: a dead peer fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Round trips before the counted ones (connection warm-up: slow start, caches, ARP).
pub const RR_WARMUP: u32 = 100;

/// Connect to `target` within its connect timeout (each resolved address in turn).
fn connect(target: &Target) -> Result<TcpStream, Failure> {
    let what = || format!("connecting to {}:{}", target.host, target.port);
    let addrs = (target.host.as_str(), target.port).to_socket_addrs().or_failed(what)?;
    let mut last = Failure::new(what(), "the host name resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, target.connect_timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(IO_TIMEOUT)).or_failed(|| "setting a read timeout")?;
                stream.set_write_timeout(Some(IO_TIMEOUT)).or_failed(|| "setting a write timeout")?;
                return Ok(stream);
            }
            Err(e) => last = Failure::new(what(), e),
        }
    }
    Err(last)
}

/// Write for `duration`; the throughput is what the server counted over the time until its
/// count arrived (so data still in flight when writing stops is not counted as sent).
pub fn send(target: &Target, duration: Duration) -> Result<Throughput, Failure> {
    let mut stream = connect(target)?;
    let buf = pattern(BUFFER_LEN);
    let start = Instant::now();
    stream.write_all(&[Mode::Sink.byte()]).or_failed(|| "send: writing the mode")?;
    let mut written: u64 = 0;
    while start.elapsed() < duration {
        stream.write_all(&buf).or_failed(|| "send: writing")?;
        written += buf.len() as u64;
    }
    stream.shutdown(Shutdown::Write).or_failed(|| "send: closing")?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).or_failed(|| "send: reading the server's byte count")?;
    let elapsed = start.elapsed();
    let counted = u64::from_le_bytes(count);
    if counted != written {
        return Err(Failure::new("send", format!("the server counted {counted} of {written} bytes")));
    }
    Ok(Throughput { bytes: counted, elapsed })
}

/// Have the server write for `duration`; the throughput is what arrived until it closed.
pub fn recv(target: &Target, duration: Duration) -> Result<Throughput, Failure> {
    let mut stream = connect(target)?;
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut request = vec![Mode::Source.byte()];
    request.extend_from_slice(&millis.to_le_bytes());
    let mut buf = vec![0u8; BUFFER_LEN];
    let start = Instant::now();
    stream.write_all(&request).or_failed(|| "recv: writing the request")?;
    let mut bytes: u64 = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::new("recv: reading", e)),
        }
    }
    Ok(Throughput { bytes, elapsed: start.elapsed() })
}

/// `count` timed round trips of `size` bytes each way, after [`RR_WARMUP`] untimed ones.
pub fn request_response(target: &Target, count: u32, size: u32) -> Result<Latency, Failure> {
    let mut stream = connect(target)?;
    stream.set_nodelay(true).or_failed(|| "rr: setting TCP_NODELAY")?;
    let mut request = vec![Mode::Echo.byte()];
    request.extend_from_slice(&size.to_le_bytes());
    stream.write_all(&request).or_failed(|| "rr: writing the request")?;
    let message = pattern(size as usize);
    let mut reply = vec![0u8; message.len()];
    let mut samples = Vec::with_capacity(count as usize);
    for i in 0..RR_WARMUP + count {
        let start = Instant::now();
        stream.write_all(&message).or_failed(|| "rr: writing")?;
        if !read_message(&mut stream, &mut reply).or_failed(|| "rr: reading")? {
            return Err(Failure::new("rr", format!("the server closed after {i} round trips")));
        }
        let rtt = start.elapsed();
        if reply != message {
            return Err(Failure::new("rr", format!("round trip {i} came back altered")));
        }
        if i >= RR_WARMUP {
            samples.push(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    stream.shutdown(Shutdown::Write).or_failed(|| "rr: closing")?;
    Latency::from_samples(&mut samples).ok_or_else(|| Failure::new("rr", "no round trip was timed"))
}

/// Ask the server to exit, and wait for its acknowledgement.
pub fn stop(target: &Target) -> Result<(), Failure> {
    let mut stream = connect(target)?;
    stream.write_all(&[Mode::Stop.byte()]).or_failed(|| "stop: writing")?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).or_failed(|| "stop: reading the acknowledgement")?;
    if ack[0] != Mode::Stop.byte() {
        return Err(Failure::new("stop", format!("unexpected acknowledgement {:#04x}", ack[0])));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{handle, Served};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A loopback server for `connections` connections (in turn); the outcomes of each.
    fn server(connections: usize) -> (Target, JoinHandle<Vec<Result<Served, String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let thread = std::thread::spawn(move || {
            (0..connections).map(|_| handle(listener.accept().expect("accept").0).map_err(|e| e.to_string())).collect()
        });
        let target = Target { host: "127.0.0.1".into(), port, connect_timeout: Duration::from_secs(5) };
        (target, thread)
    }

    #[test]
    fn every_test_runs_against_the_server() {
        let (target, thread) = server(4);
        let sent = send(&target, Duration::from_millis(100)).expect("send");
        assert!(sent.bytes > 0 && sent.elapsed >= Duration::from_millis(100), "{sent:?}");
        let received = recv(&target, Duration::from_millis(100)).expect("recv");
        assert!(received.bytes > 0 && received.elapsed >= Duration::from_millis(100), "{received:?}");
        let latency = request_response(&target, 50, 64).expect("rr");
        assert_eq!(latency.count, 50);
        assert!(
            latency.min_ns <= latency.p50_ns && latency.p50_ns <= latency.p99_ns && latency.p99_ns <= latency.max_ns
        );
        stop(&target).expect("stop");
        let outcomes = thread.join().expect("server thread");
        assert_eq!(outcomes, vec![Ok(Served::Done), Ok(Served::Done), Ok(Served::Done), Ok(Served::Stop)]);
    }

    #[test]
    fn a_refused_connection_is_a_clear_failure() {
        // Bind and drop: the port is (almost certainly) closed now.
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let target = Target { host: "127.0.0.1".into(), port, connect_timeout: Duration::from_secs(1) };
        let err = stop(&target).expect_err("connected to a closed port").to_string();
        assert!(err.starts_with(&format!("connecting to 127.0.0.1:{port} failed: ")), "{err}");
    }
}
