//! Where the serial console's bytes go. The vCPU that writes a byte must never block on a
//! slow or stuck reader (a full pipe, a closed terminal), so bytes go through a bounded
//! queue to a `tern-console` writer thread; when the queue is full, bytes are dropped and
//! counted instead of stalling the guest.
//!
//! Whatever the sink, the last [`TAIL_BYTES`] bytes are also kept in a [`ConsoleTail`], so a
//! failed boot can say what the guest printed last even when its console was discarded.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern_sync::LockExt;

use crate::seccomp::{Hardening, SeccompRole};

/// Chunks the writer thread may fall behind by before bytes are dropped.
const QUEUE_CHUNKS: usize = 1024;
/// Bytes collected on the vCPU side before they are handed to the writer thread.
const CHUNK_BYTES: usize = 256;
/// How long dropping the writer waits for queued output to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Console bytes kept for `VmHandle::console_tail`.
pub const TAIL_BYTES: usize = 8 * 1024;

/// The last [`TAIL_BYTES`] bytes the guest wrote to its console; shared between the serial
/// device (writer) and the VM handle (reader).
#[derive(Debug, Default)]
pub struct ConsoleTail {
    bytes: Mutex<VecDeque<u8>>,
    /// Bytes lost because the console's sink could not keep up.
    dropped_bytes: AtomicU64,
}

impl ConsoleTail {
    fn push(&self, buf: &[u8]) {
        let mut bytes = self.bytes.lock_unpoisoned();
        let keep = buf.len().min(TAIL_BYTES);
        let overflow = (bytes.len() + keep).saturating_sub(TAIL_BYTES);
        bytes.drain(..overflow);
        bytes.extend(&buf[buf.len() - keep..]);
    }

    /// Bytes the guest wrote that never reached the console's sink (it could not keep up).
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes.load(Ordering::Relaxed)
    }

    /// The kept bytes, oldest first, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        let bytes = self.bytes.lock_unpoisoned();
        let (front, back) = bytes.as_slices();
        String::from_utf8_lossy(&[front, back].concat()).into_owned()
    }
}

/// A `Write` that never blocks its caller: see the module docs.
pub struct ConsoleWriter {
    pending: Vec<u8>,
    queue: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
    tail: Arc<ConsoleTail>,
}

impl ConsoleWriter {
    /// Bytes go to `sink` from a background thread (`tern-console`, hardened as such).
    pub fn spawn(mut sink: Box<dyn Write + Send>, hardening: &Hardening) -> io::Result<Self> {
        let (queue, chunks) = sync_channel::<Vec<u8>>(QUEUE_CHUNKS);
        let thread =
            crate::seccomp::spawn(crate::threads::CONSOLE.into(), SeccompRole::Console, hardening, move || {
                for chunk in chunks {
                    // A closed or failing sink loses console output, nothing else.
                    if sink.write_all(&chunk).and_then(|()| sink.flush()).is_err() {
                        tracing::trace!("console output failed; dropping {} bytes", chunk.len());
                    }
                }
            })?;
        Ok(ConsoleWriter { pending: Vec::new(), queue: Some(queue), thread: Some(thread), tail: Arc::default() })
    }

    /// Output is thrown away.
    pub fn discard() -> Self {
        ConsoleWriter { pending: Vec::new(), queue: None, thread: None, tail: Arc::default() }
    }

    /// The tail of everything written, readable while the guest runs and after.
    pub fn tail(&self) -> Arc<ConsoleTail> {
        self.tail.clone()
    }

    #[cfg(test)]
    /// Bytes lost because the sink could not keep up (also [`ConsoleTail::dropped_bytes`]).
    pub fn dropped_bytes(&self) -> u64 {
        self.tail.dropped_bytes()
    }

    fn send_pending(&mut self) {
        let Some(queue) = &self.queue else {
            self.pending.clear();
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::take(&mut self.pending);
        match queue.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(chunk)) | Err(TrySendError::Disconnected(chunk)) => {
                self.tail.dropped_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        if self.queue.is_some() {
            self.pending.extend_from_slice(buf);
            if self.pending.len() >= CHUNK_BYTES {
                self.send_pending();
            }
        }
        Ok(buf.len())
    }

    // The serial device flushes after every byte; sending each byte at once keeps the
    // console live (a guest that prints a prompt and waits must be seen).
    fn flush(&mut self) -> io::Result<()> {
        self.send_pending();
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.send_pending();
        // Closing the queue ends the writer thread once it has written what is queued.
        self.queue = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            // The sink is stuck in a write (nobody reads the pipe); the thread ends when
            // that write returns. Waiting here would hang the VMM's shutdown.
            tracing::warn!("console sink is stuck; leaving its writer thread behind");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenSink;

    impl Write for BrokenSink {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn delivers_bytes_in_order() {
        let buffer = SharedBuffer::default();
        let hardening = Hardening::trap_for_test();
        let mut writer = ConsoleWriter::spawn(Box::new(buffer.clone()), &hardening).unwrap();
        for byte in b"hello, console\n" {
            writer.write_all(&[*byte]).unwrap();
            writer.flush().unwrap();
        }
        drop(writer);
        assert_eq!(buffer.0.lock().unwrap().as_slice(), b"hello, console\n");
        hardening.assert_no_violation();
    }

    #[test]
    fn broken_sink_does_not_fail_the_writer() {
        let mut writer = ConsoleWriter::spawn(Box::new(BrokenSink), &Hardening::off()).unwrap();
        writer.write_all(b"lost").unwrap();
        writer.flush().unwrap();
    }

    #[test]
    fn discard_accepts_everything() {
        let mut writer = ConsoleWriter::discard();
        writer.write_all(&[0u8; 10_000]).unwrap();
        writer.flush().unwrap();
        assert_eq!(writer.dropped_bytes(), 0);
    }

    #[test]
    fn tail_keeps_the_last_bytes_even_when_discarding() {
        let mut writer = ConsoleWriter::discard();
        let tail = writer.tail();
        assert_eq!(tail.text(), "");
        writer.write_all(b"first line\n").unwrap();
        assert_eq!(tail.text(), "first line\n");
        let long: Vec<u8> = (0..TAIL_BYTES + 100).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in long.chunks(7) {
            writer.write_all(chunk).unwrap();
        }
        writer.write_all(b"end").unwrap();
        let text = tail.text();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with("end"), "{text:?}");
        let expected = [&long[long.len() - (TAIL_BYTES - 3)..], b"end"].concat();
        assert_eq!(text.as_bytes(), expected.as_slice());
        // One write longer than the tail keeps only its own end.
        writer.write_all(&vec![b'z'; TAIL_BYTES * 2]).unwrap();
        assert_eq!(tail.text(), "z".repeat(TAIL_BYTES));
    }
}
