//! The vsock muxer: routes guest packets to connections, accepts host clients on the hybrid
//! unix socket (`CONNECT <port>\n` → `OK <hostport>\n`), connects guest-initiated streams to
//! `<uds_path>_<port>`, and decides which packet goes into the next guest rx buffer.
//!
//! The muxer owns a private epoll set for the listener and every host stream; the event
//! handler registers only that epoll fd with the device event loop. Connections come and go
//! without touching the event manager's bookkeeping, and closing a stream can never leave a
//! stale fd registered there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection};
use super::packet::{Header, RxOp, VSOCK_HOST_CID, VSOCK_OP_REQUEST, VSOCK_OP_RST, VSOCK_TYPE_STREAM};

/// Most connections (plus half-open host clients) one device keeps.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most connectionless RSTs waiting for an rx buffer; more are dropped (the guest times out).
const MAX_PENDING_RSTS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted from a host client.
const MAX_CONNECT_LINE: usize = 32;
/// Host-initiated connections get local ports from here up, far from well-known ports.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events handled per wait.
const EVENTS_PER_WAIT: usize = 64;

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Who owns an fd in the muxer's epoll set.
#[derive(Clone, Copy, Debug)]
enum FdOwner {
    Listener,
    Client,
    Conn(ConnKey),
    /// A connection the guest reset while it still had bytes for the host (see `draining`).
    Draining,
}

/// Something waiting for a guest rx buffer.
#[derive(Clone, Copy, Debug)]
enum RxItem {
    Conn(ConnKey),
    /// An RST for a packet that matched no connection.
    Rst(ConnKey),
}

/// A host client that connected but has not finished its `CONNECT` line.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Routes packets between the guest and host unix sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    epoll: Epoll,
    owners: HashMap<RawFd, FdOwner>,
    /// Events each registered fd is watched for (to skip needless EPOLL_CTL_MODs).
    watched: HashMap<RawFd, EventSet>,
    conns: HashMap<ConnKey, Connection>,
    /// Connections the guest has reset, still delivering what it sent before to the host; out
    /// of `conns`, so the guest may reuse their ports at once.
    draining: HashMap<RawFd, Connection>,
    clients: HashMap<RawFd, PendingClient>,
    rxq: VecDeque<RxItem>,
    queued: HashSet<ConnKey>,
    pending_rsts: usize,
    next_local_port: u32,
}

impl Muxer {
    /// Build a muxer around an already bound, non-blocking listener.
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: Arc<UnixListener>) -> std::io::Result<Self> {
        let mut muxer = Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll: Epoll::new()?,
            owners: HashMap::new(),
            watched: HashMap::new(),
            conns: HashMap::new(),
            draining: HashMap::new(),
            clients: HashMap::new(),
            rxq: VecDeque::new(),
            queued: HashSet::new(),
            pending_rsts: 0,
            next_local_port: FIRST_LOCAL_PORT,
        };
        let fd = muxer.listener.as_raw_fd();
        muxer.watch(fd, FdOwner::Listener, EventSet::IN)?;
        Ok(muxer)
    }

    /// The epoll fd to register with the device event loop (readable when a host fd is ready).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    #[cfg(test)]
    /// Number of live connections (tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.draining.len()
    }

    #[cfg(test)]
    /// A connection, for tests and metrics.
    pub fn connection(&self, key: &ConnKey) -> Option<&Connection> {
        self.conns.get(key)
    }

    fn watch(&mut self, fd: RawFd, owner: FdOwner, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, fd as u64))?;
        self.owners.insert(fd, owner);
        self.watched.insert(fd, events);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        if self.owners.remove(&fd).is_some() {
            self.watched.remove(&fd);
            if let Err(e) = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()) {
                tracing::debug!(fd, error = %e, "vsock muxer cannot unwatch an fd");
            }
        }
    }

    /// Whether some packet is waiting for a guest rx buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// A packet from the guest's tx queue, already validated as a descriptor chain.
    pub fn send_pkt<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        tracing::trace!(?hdr, "vsock tx");
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            tracing::debug!(src = hdr.src_cid, dst = hdr.dst_cid, "vsock packet with a wrong CID dropped");
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if hdr.type_ != VSOCK_TYPE_STREAM {
            tracing::debug!(type_ = hdr.type_, "vsock packet of an unsupported type");
            self.queue_rst(key, hdr.op);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.send_pkt(hdr, data);
            self.refresh(key);
            return;
        }
        if hdr.op == VSOCK_OP_REQUEST {
            self.guest_connect(key, hdr);
        } else {
            self.queue_rst(key, hdr.op);
        }
    }

    /// Answer a packet that matched no connection with an RST (never an RST with an RST).
    fn queue_rst(&mut self, key: ConnKey, op: u16) {
        if op == VSOCK_OP_RST {
            return;
        }
        if self.pending_rsts >= MAX_PENDING_RSTS {
            tracing::debug!("too many pending vsock RSTs; dropping one");
            return;
        }
        self.pending_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    /// The guest connects to host port `key.local_port`: try `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.open_count() >= MAX_CONNECTIONS {
            tracing::warn!("vsock connection limit reached; refusing a guest connection");
            self.queue_rst(key, hdr.op);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        // A unix connect completes at once (or fails when nobody listens); it only blocks
        // while the listener's backlog is full.
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "no host listener for a guest vsock connection");
                self.queue_rst(key, hdr.op);
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!(error = %e, "cannot make a host vsock stream non-blocking");
            self.queue_rst(key, hdr.op);
            return;
        }
        let fd = stream.as_raw_fd();
        let conn = Connection::new_peer(stream, key.local_port, key.peer_port, hdr);
        if let Err(e) = self.watch(fd, FdOwner::Conn(key), EventSet::empty()) {
            tracing::warn!(error = %e, "cannot watch a host vsock stream");
            self.queue_rst(key, hdr.op);
            return;
        }
        tracing::debug!(local = key.local_port, peer = key.peer_port, "guest opened a vsock connection");
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    /// Host streams the muxer holds: connections (draining ones too) and half-open clients.
    fn open_count(&self) -> usize {
        self.conns.len() + self.draining.len() + self.clients.len()
    }

    /// Re-sync a connection with the epoll set and the rx queue after anything happened to it.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else { return };
        let fd = conn.stream().as_raw_fd();
        let state = conn.state();
        if state == ConnState::Draining {
            // Only the host side is left: the key is the guest's to reuse.
            if let Some(conn) = self.conns.remove(&key) {
                self.queued.remove(&key);
                tracing::debug!(local = key.local_port, peer = key.peer_port, "vsock connection draining to the host");
                self.owners.insert(fd, FdOwner::Draining);
                self.draining.insert(fd, conn);
                self.refresh_draining(fd);
            }
            return;
        }
        let interest = conn.interest();
        let pending = conn.has_pending_rx();
        match interest {
            Some(events) if self.owners.contains_key(&fd) => {
                if self.watched.get(&fd) != Some(&events) {
                    if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, fd as u64)) {
                        tracing::warn!(error = %e, "cannot update a host vsock stream's epoll events");
                    }
                    self.watched.insert(fd, events);
                }
            }
            // Never re-watch a stream once it was dropped from the set.
            Some(_) => {}
            None => self.unwatch(fd),
        }
        if state == ConnState::Done {
            self.unwatch(fd);
            self.conns.remove(&key);
            tracing::debug!(local = key.local_port, peer = key.peer_port, "vsock connection closed");
            return;
        }
        if pending && self.queued.insert(key) {
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    /// Re-sync a draining connection with the epoll set; forget it once it is done.
    fn refresh_draining(&mut self, fd: RawFd) {
        let Some(conn) = self.draining.get(&fd) else { return };
        match (conn.state(), conn.interest()) {
            (ConnState::Draining, Some(events)) => {
                if self.watched.get(&fd) != Some(&events) {
                    if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, fd as u64)) {
                        tracing::warn!(error = %e, "cannot update a host vsock stream's epoll events");
                    }
                    self.watched.insert(fd, events);
                }
            }
            _ => {
                self.unwatch(fd);
                self.draining.remove(&fd);
            }
        }
    }

    fn draining_event(&mut self, fd: RawFd, set: EventSet) {
        let Some(conn) = self.draining.get_mut(&fd) else { return };
        if set.contains(EventSet::OUT) {
            conn.flush_to_host();
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_hung_up();
        }
        self.refresh_draining(fd);
    }

    /// Handle whatever is ready on the host side (the muxer epoll fd was readable).
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock muxer epoll wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                let set = ev.event_set();
                match self.owners.get(&fd).copied() {
                    Some(FdOwner::Listener) => self.accept_clients(),
                    Some(FdOwner::Client) => self.read_connect_line(fd),
                    Some(FdOwner::Conn(key)) => self.conn_event(key, set),
                    Some(FdOwner::Draining) => self.draining_event(fd, set),
                    None => tracing::trace!(fd, "event for an fd the vsock muxer no longer watches"),
                }
            }
            if n < EVENTS_PER_WAIT {
                return;
            }
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if set.contains(EventSet::IN) {
            conn.host_readable();
        }
        if set.contains(EventSet::OUT) {
            conn.flush_to_host();
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_hung_up();
        }
        self.refresh(key);
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock listener accept failed");
                    return;
                }
            };
            if self.open_count() >= MAX_CONNECTIONS {
                // Closing at once lets the client retry instead of hanging in our backlog.
                tracing::warn!("vsock connection limit reached; refusing a host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "cannot make a vsock client non-blocking");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.watch(fd, FdOwner::Client, EventSet::IN) {
                tracing::warn!(error = %e, "cannot watch a vsock client");
                continue;
            }
            self.clients.insert(fd, PendingClient { stream, line: Vec::new() });
        }
    }

    /// Read the client's `CONNECT <port>\n` one byte at a time, so no payload byte that follows
    /// it is consumed before the connection exists.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match client.stream.read(&mut byte) {
                Ok(0) => break Err("client closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&client.line),
                Ok(_) if client.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long"),
                Ok(_) => client.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("client read failed"),
            }
        };
        self.unwatch(fd);
        let Some(client) = self.clients.remove(&fd) else { return };
        match port {
            Ok(peer_port) => self.host_connect(client.stream, peer_port),
            Err(reason) => tracing::debug!(reason, "vsock host client dropped"),
        }
    }

    /// A host client asked for guest port `peer_port`: allocate a local port, send REQUEST.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            tracing::warn!("no free vsock local port");
            return;
        };
        let key = ConnKey { local_port, peer_port };
        let fd = stream.as_raw_fd();
        let conn = Connection::new_local(stream, local_port, peer_port);
        if let Err(e) = self.watch(fd, FdOwner::Conn(key), EventSet::empty()) {
            tracing::warn!(error = %e, "cannot watch a host vsock stream");
            return;
        }
        tracing::debug!(local = local_port, peer = peer_port, "host opened a vsock connection");
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&ConnKey { local_port: port, peer_port }) {
                return Some(port);
            }
        }
        None
    }

    /// Fill one guest rx buffer: returns the header to write (addressing and credit included)
    /// and whether its payload was written into `data`, or None when nothing is pending.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) -> Option<Header> {
        // Each item at most once per call: a connection that produced nothing but still has
        // work goes to the back, and must not spin here.
        let mut budget = self.rxq.len();
        while budget > 0 {
            budget -= 1;
            let Some(item) = self.rxq.pop_front() else { break };
            match item {
                RxItem::Rst(key) => {
                    self.pending_rsts = self.pending_rsts.saturating_sub(1);
                    return Some(self.header(key, RxOp::control(VSOCK_OP_RST), 0, 0));
                }
                RxItem::Conn(key) => {
                    self.queued.remove(&key);
                    let Some(conn) = self.conns.get_mut(&key) else { continue };
                    let op = conn.next_rx(data);
                    let (buf_alloc, fwd_cnt) = (conn.buf_alloc(), conn.fwd_cnt());
                    // Requeues the connection at the back if it has more (round robin).
                    self.refresh(key);
                    if let Some(op) = op {
                        let hdr = self.header(key, op, buf_alloc, fwd_cnt);
                        tracing::trace!(?hdr, "vsock rx");
                        return Some(hdr);
                    }
                }
            }
        }
        None
    }

    fn header(&self, key: ConnKey, op: RxOp, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: op.len,
            type_: VSOCK_TYPE_STREAM,
            op: op.op,
            flags: op.flags,
            buf_alloc,
            fwd_cnt,
        }
    }
}

/// Parse `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text")?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ").ok_or("expected CONNECT <port>")?;
    port.trim().parse::<u32>().map_err(|_| "bad port in CONNECT")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"connect 5").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(b"CONNECT \xff").is_err());
    }
}
