//! The link to the agent (the `tern-fs-link` thread): the connection to the agent's watch port,
//! batch numbering, and the resyncs after each (re)connect and on the periodic timer.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_change_records::{
    ChangeBatch, ChangeKind, Generation, HostContent, HostEntry, AGENT_WATCH_PORT, MAX_CARRIED_BYTES,
    MAX_EARLIER_TARGETS, MAX_GENERATIONS_PER_BATCH,
};

use super::coalesce::PendingBatch;
use super::host_read::{is_data_link, read_generation, ShareRoot};
use super::{bump, unix_now_ns, Outgoing, Shared};

/// First pause between connection attempts while the agent is not listening yet.
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// Longest pause between connection attempts.
const MAX_RETRY: Duration = Duration::from_millis(500);
/// How long the VMM may take to answer `CONNECT`, and a send may block on a stuck guest.
const LINK_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The `tern-fs-link` thread: the connection to the agent's watch port.
pub(super) struct AgentLink {
    pub(super) uds_path: PathBuf,
    pub(super) shared: Arc<Shared>,
    pub(super) resync_interval: Duration,
    /// Per (share, link): the targets of the generations read so far, latest first.
    pub(super) history: RefCell<HashMap<(String, String), VecDeque<String>>>,
}

impl AgentLink {
    pub(super) fn run(self, rx: Receiver<Outgoing>) {
        let mut conn: Option<UnixStream> = None;
        let mut seq = 0u64;
        let mut retry = FIRST_RETRY;
        let mut next_attempt = Instant::now();
        let mut next_resync = Instant::now() + self.resync_interval;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            if conn.is_none() && now >= next_attempt {
                match connect_watch_port(&self.uds_path) {
                    Ok(stream) => {
                        tracing::debug!("connected to the agent's watch port");
                        bump(&self.shared.counters.connects, 1);
                        retry = FIRST_RETRY;
                        seq = 0;
                        conn = Some(stream);
                        // Whatever happened while disconnected is unknown: compare everything.
                        self.resync_all(&mut conn, &mut seq);
                        next_resync = Instant::now() + self.resync_interval;
                    }
                    Err(e) => {
                        tracing::trace!(error = %e, "agent watch port not ready");
                        next_attempt = now + retry;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
            let wake_at = if conn.is_none() { next_resync.min(next_attempt) } else { next_resync };
            let timeout = wake_at.saturating_duration_since(Instant::now());
            match rx.recv_timeout(timeout) {
                Ok(Outgoing::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Outgoing::Batch(batch)) => {
                    self.send(&mut conn, &mut seq, batch);
                }
                Ok(Outgoing::Resync(share)) => {
                    self.send(&mut conn, &mut seq, resync_batch(share));
                }
                Ok(Outgoing::ResyncAll) => self.resync_all(&mut conn, &mut seq),
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= next_resync {
                        self.resync_all(&mut conn, &mut seq);
                        next_resync = Instant::now() + self.resync_interval;
                    }
                }
            }
            if conn.is_none() && next_attempt > Instant::now() + retry {
                next_attempt = Instant::now();
            }
        }
    }

    fn resync_all(&self, conn: &mut Option<UnixStream>, seq: &mut u64) {
        let shares: Vec<String> = self.shared.lock().shares.keys().cloned().collect();
        for share in shares {
            self.send(conn, seq, resync_batch(share));
        }
    }

    /// Send one batch; without a connection it is dropped (the resync after the next connect
    /// covers it). A failed send drops the connection.
    fn send(&self, conn: &mut Option<UnixStream>, seq: &mut u64, batch: PendingBatch) {
        let Some(stream) = conn.as_mut() else {
            return;
        };
        *seq += 1;
        let records = batch.records.len() as u64;
        let resync = batch.resync;
        let (generations, entries) = self.read_on_host(&batch);
        let message = ChangeBatch {
            share: batch.share,
            seq: *seq,
            first_change_unix_ns: batch.first_change_unix_ns,
            flush_unix_ns: batch.flush_unix_ns,
            send_unix_ns: unix_now_ns(),
            resync,
            records: batch.records,
            generations,
            entries,
        };
        let counters = &self.shared.counters;
        match tern_change_records::send_batch(stream, &message) {
            Ok(()) => {
                bump(&counters.batches_sent, 1);
                bump(&counters.records_sent, records);
                if resync {
                    bump(&counters.resyncs_sent, 1);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a change batch; reconnecting");
                bump(&counters.send_failures, 1);
                *conn = None;
            }
        }
    }

    /// What `batch` carries besides its records, read on the host just before it is sent
    /// (see [`super::host_read`]): the generations its `..data` links publish now, and the
    /// other files and symlinks its records name (kubelet's own `..` names aside: their
    /// directories travel as generations).
    fn read_on_host(&self, batch: &PendingBatch) -> (Vec<Generation>, Vec<HostEntry>) {
        let named = batch.records.iter().filter(|r| r.kind != ChangeKind::Removed);
        let mut links: Vec<&str> = named.clone().filter(|r| is_data_link(&r.path)).map(|r| r.path.as_str()).collect();
        links.sort_unstable();
        links.dedup();
        links.truncate(MAX_GENERATIONS_PER_BATCH);
        let mut plain: Vec<&str> =
            named.filter(|r| !r.path.split('/').any(|c| c.starts_with(".."))).map(|r| r.path.as_str()).collect();
        plain.sort_unstable();
        plain.dedup();
        if links.is_empty() && plain.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let Some(host_dir) = self.shared.lock().shares.get(&batch.share).map(|s| s.host_dir.clone()) else {
            return (Vec::new(), Vec::new());
        };
        let Some(root) = ShareRoot::open(&host_dir) else {
            return (Vec::new(), Vec::new());
        };
        let mut budget = MAX_CARRIED_BYTES;
        let entries = plain
            .into_iter()
            .filter_map(|path| root.entry(path, &mut budget))
            .filter(|e| e.content != HostContent::Dir)
            .collect();
        (self.generations(&batch.share, &root, links), entries)
    }

    /// The generations `links` of `share` publish now, each with the targets read before it.
    fn generations(&self, share: &str, root: &ShareRoot, links: Vec<&str>) -> Vec<Generation> {
        let mut history = self.history.borrow_mut();
        links
            .into_iter()
            .filter_map(|link| {
                let order = self.shared.generation_order.fetch_add(1, Ordering::Relaxed) + 1;
                let mut generation = read_generation(root, link, order)?;
                let HostContent::Symlink(target) = &generation.link.content else {
                    return None;
                };
                let seen = history.entry((share.to_owned(), link.to_owned())).or_default();
                seen.retain(|t| t != target);
                generation.earlier = seen.iter().cloned().collect();
                seen.push_front(target.clone());
                seen.truncate(MAX_EARLIER_TARGETS);
                Some(generation)
            })
            .collect()
    }
}

fn resync_batch(share: String) -> PendingBatch {
    let now = unix_now_ns();
    PendingBatch { share, first_change_unix_ns: now, flush_unix_ns: now, resync: true, records: Vec::new() }
}

/// Open a stream to the agent's watch port through the hybrid vsock socket; sends may block
/// at most [`LINK_IO_TIMEOUT`] on a stuck guest.
fn connect_watch_port(uds_path: &Path) -> std::io::Result<UnixStream> {
    let sock = crate::hybrid_vsock::connect(uds_path, AGENT_WATCH_PORT, LINK_IO_TIMEOUT)
        .map_err(|e| std::io::Error::new(ErrorKind::ConnectionRefused, e))?;
    sock.set_write_timeout(Some(LINK_IO_TIMEOUT))?;
    Ok(sock)
}
