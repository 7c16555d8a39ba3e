//! One vsock stream connection: the state machine between a guest AF_VSOCK socket and a host
//! unix stream, with credit-based flow control in both directions and half-close.
//!
//! Directions, as the spec names them from the device's point of view:
//! - tx (guest → host): guest RW payloads are written to the host stream; what the stream cannot
//!   take now waits in `tx_buf`, which is bounded by the credit we advertise (`buf_alloc`), so a
//!   guest that respects credit can never overflow it. `fwd_cnt` counts bytes handed to the host.
//! - rx (host → guest): host bytes are read straight into guest rx buffers, never more than the
//!   guest's advertised credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`).

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, RxOp, MAX_PKT_DATA, VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE,
    VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, VSOCK_SHUTDOWN_RCV, VSOCK_SHUTDOWN_SEND,
};

/// Receive buffer space we advertise to the guest per connection (our `buf_alloc`); it bounds
/// the bytes buffered for a host socket that does not read.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once this many forwarded bytes are unknown to the guest; anything below
/// `CONN_TX_BUF_SIZE` keeps the guest from stalling on a stale view.
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked to connect; REQUEST is queued or sent, waiting for RESPONSE.
    LocalInit,
    /// Data flows (possibly half-closed).
    Established,
    /// Torn down: the host stream is shut, an RST still has to reach the guest.
    Killed,
    /// The guest reset the connection after sending bytes the host stream has not taken yet:
    /// they were accepted from the guest, so they still go to the host, then the host gets EOF.
    /// Nothing goes to the guest any more.
    Draining,
    /// Nothing left to do; the muxer drops the connection.
    Done,
}

/// A guest↔host stream connection.
pub struct Connection {
    stream: UnixStream,
    state: ConnState,
    /// Bytes from the guest that the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    /// The hybrid-vsock reply (`OK <port>\n`) still to write to the host, outside the credit.
    ctl_out: Vec<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_to_peer: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent (or queued) to the guest.
    shutdown_sent: u32,
    /// The host stream returned EOF.
    host_eof: bool,
    /// The host peer is gone entirely (EPOLLHUP/EPOLLERR): writes can only fail.
    host_hup: bool,
    /// We already did `shutdown(Write)` on the host stream.
    host_write_shut: bool,
    /// The host stream may have bytes for the guest (readable, not yet drained to EAGAIN).
    host_readable: bool,
    pending_request: bool,
    pending_response: bool,
    pending_rst: bool,
    pending_credit_update: bool,
    pending_shutdown: u32,
    /// A CREDIT_REQUEST went out since the guest last told us its credit.
    credit_requested: bool,
    local_port: u32,
    peer_port: u32,
}

impl Connection {
    /// A host client connected and asked for guest port `peer_port`: queue a REQUEST.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut conn = Self::new(stream, ConnState::LocalInit, local_port, peer_port);
        conn.pending_request = true;
        conn
    }

    /// The guest connected (its REQUEST carried its credit) and the host accepted: queue a RESPONSE.
    pub fn new_peer(stream: UnixStream, local_port: u32, peer_port: u32, hdr: &Header) -> Self {
        let mut conn = Self::new(stream, ConnState::Established, local_port, peer_port);
        conn.update_peer_credit(hdr);
        conn.pending_response = true;
        conn
    }

    fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            tx_buf: VecDeque::new(),
            ctl_out: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            shutdown_sent: 0,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            host_readable: false,
            pending_request: false,
            pending_response: false,
            pending_rst: false,
            pending_credit_update: false,
            pending_shutdown: 0,
            credit_requested: false,
            local_port,
            peer_port,
        }
    }

    /// The host stream (for epoll registration).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Our receive window as the guest sees it.
    pub fn buf_alloc(&self) -> u32 {
        CONN_TX_BUF_SIZE
    }

    /// Bytes from the guest forwarded to the host so far.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    #[cfg(test)]
    /// Bytes buffered for the host (tests and metrics).
    pub fn buffered(&self) -> usize {
        self.tx_buf.len() + self.ctl_out.len()
    }

    /// How many bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.credit_requested = false;
    }

    /// Tear the connection down: shut the host stream and queue an RST for the guest.
    pub fn kill(&mut self) {
        if matches!(self.state, ConnState::Killed | ConnState::Done) {
            return;
        }
        if self.state == ConnState::Draining {
            // The guest is gone already: nothing to tell it, the rest cannot be delivered.
            tracing::debug!(undelivered = self.tx_buf.len(), "vsock connection dropped while draining to the host");
            self.close_silently();
            return;
        }
        tracing::debug!(
            local = self.local_port,
            peer = self.peer_port,
            undelivered = self.tx_buf.len(),
            "vsock connection reset"
        );
        let _ = self.stream.shutdown(Shutdown::Both);
        self.state = ConnState::Killed;
        self.pending_rst = true;
        self.tx_buf = VecDeque::new();
        self.ctl_out = Vec::new();
    }

    /// The guest reset the connection. What it sent before is ours to deliver: a guest that
    /// closes its socket resets the connection on its own after a timeout (8 s in Linux), and
    /// a host reader that is slower than that must still get every byte, then EOF.
    fn guest_reset(&mut self) {
        let undelivered = !self.tx_buf.is_empty() || !self.ctl_out.is_empty();
        if self.state == ConnState::Established && undelivered && !self.host_write_shut && !self.host_hup {
            self.state = ConnState::Draining;
            self.pending_rst = false;
            self.pending_request = false;
            self.pending_response = false;
            self.pending_credit_update = false;
            self.pending_shutdown = 0;
            self.flush_to_host();
        } else {
            self.close_silently();
        }
    }

    /// Drop the connection without telling the guest (it reset it, or it never existed there).
    fn close_silently(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.state = ConnState::Done;
    }

    /// A packet from the guest for this connection. `data` is the validated payload (RW only).
    pub fn send_pkt<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        if matches!(self.state, ConnState::Killed | ConnState::Done | ConnState::Draining) {
            // Only the RST we owe the guest is left; its own RST settles it.
            if hdr.op == VSOCK_OP_RST {
                self.state = ConnState::Done;
            }
            return;
        }
        self.update_peer_credit(hdr);
        match hdr.op {
            VSOCK_OP_RW => self.guest_data(hdr, data),
            VSOCK_OP_RESPONSE if self.state == ConnState::LocalInit => {
                self.state = ConnState::Established;
                self.ctl_out = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host();
            }
            VSOCK_OP_RST => {
                tracing::debug!(
                    local = self.local_port,
                    peer = self.peer_port,
                    undelivered = self.tx_buf.len(),
                    "guest reset the vsock connection"
                );
                self.guest_reset();
            }
            VSOCK_OP_SHUTDOWN if self.state == ConnState::Established => {
                self.peer_shutdown |= hdr.flags & VSOCK_SHUTDOWN_BOTH;
                self.apply_peer_shutdown();
            }
            VSOCK_OP_CREDIT_UPDATE => {}
            VSOCK_OP_CREDIT_REQUEST => self.pending_credit_update = true,
            op => {
                tracing::debug!(op, state = ?self.state, "unexpected vsock op for the connection state");
                self.kill();
            }
        }
    }

    fn guest_data<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        if self.state != ConnState::Established || self.peer_shutdown & VSOCK_SHUTDOWN_SEND != 0 {
            tracing::debug!(state = ?self.state, "guest sent data it may not send");
            self.kill();
            return;
        }
        let Some(data) = data else { return };
        let len = data.len().min(hdr.len as usize);
        if len == 0 {
            return;
        }
        if self.host_write_shut || self.host_hup {
            // The host cannot take data anymore: the guest keeps writing into a closed pipe.
            self.kill();
            return;
        }
        // A guest that respects our credit never has more than buf_alloc bytes outstanding.
        if self.tx_buf.len() + len > CONN_TX_BUF_SIZE as usize {
            tracing::warn!(buffered = self.tx_buf.len(), len, "guest overran its vsock credit");
            self.kill();
            return;
        }
        let mut written = 0usize;
        if self.tx_buf.is_empty() && self.ctl_out.is_empty() {
            match data.subslice(0, len).and_then(|s| self.stream.write_volatile(&s)) {
                Ok(n) => written = n,
                Err(e) if io_kind(&e) == Some(ErrorKind::WouldBlock) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "host vsock stream write failed");
                    self.kill();
                    return;
                }
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < len {
            let rest = len - written;
            let mut chunk = vec![0u8; rest];
            match data.subslice(written, rest) {
                Ok(s) => {
                    let copied = s.copy_to(&mut chunk[..]);
                    self.tx_buf.extend(&chunk[..copied]);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read guest vsock payload");
                    self.kill();
                    return;
                }
            }
        }
        self.check_credit_update();
    }

    /// Write buffered bytes to the host stream (on EPOLLOUT, or after queuing new ones).
    pub fn flush_to_host(&mut self) {
        if !matches!(self.state, ConnState::Established | ConnState::Draining) {
            return;
        }
        while !self.ctl_out.is_empty() {
            match self.stream.write(&self.ctl_out) {
                Ok(0) => break,
                Ok(n) => {
                    self.ctl_out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "host vsock stream write failed");
                    self.kill();
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "host vsock stream write failed");
                    self.kill();
                    return;
                }
            }
        }
        if self.state == ConnState::Draining {
            if self.tx_buf.is_empty() && self.ctl_out.is_empty() {
                // Everything arrived: the host reads it, then EOF.
                tracing::debug!(local = self.local_port, peer = self.peer_port, "vsock connection drained");
                self.close_silently();
            }
            return;
        }
        self.check_credit_update();
        self.apply_peer_shutdown();
    }

    fn check_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_to_peer).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending_credit_update = true;
        }
    }

    /// Carry the guest's SHUTDOWN over to the host once everything it sent was delivered.
    fn apply_peer_shutdown(&mut self) {
        if self.state != ConnState::Established || !self.tx_buf.is_empty() || !self.ctl_out.is_empty() {
            return;
        }
        if self.peer_shutdown & VSOCK_SHUTDOWN_SEND != 0 && !self.host_write_shut {
            // The host reads EOF but can still write back.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let host_done = self.host_eof || self.host_hup;
        if self.peer_shutdown == VSOCK_SHUTDOWN_BOTH || (self.host_write_shut && host_done) {
            // Both directions are finished: the spec's way to end is an RST.
            self.kill();
        }
    }

    /// The host stream is readable (EPOLLIN).
    pub fn host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host peer hung up or errored (EPOLLHUP/EPOLLERR): drain what is left, then close.
    pub fn host_hung_up(&mut self) {
        if self.state == ConnState::Draining {
            // Nobody is left to deliver the rest to.
            self.kill();
            return;
        }
        self.host_hup = true;
        self.host_readable = true;
        // Before the guest answered, the client gave up; after EOF (or while the guest takes
        // no data) nothing is left to read: either way the connection is over.
        if self.state == ConnState::LocalInit || !self.wants_host_read() {
            self.kill();
        }
    }

    /// Whether `next_rx` has something to emit.
    pub fn has_pending_rx(&self) -> bool {
        if self.state == ConnState::Draining {
            return false;
        }
        self.pending_rst
            || self.pending_request
            || self.pending_response
            || self.pending_credit_update
            || self.pending_shutdown != 0
            || (self.wants_host_read() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Host bytes should flow to the guest (whether or not credit allows it right now).
    fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & VSOCK_SHUTDOWN_RCV == 0
            && self.shutdown_sent & VSOCK_SHUTDOWN_SEND == 0
    }

    /// The epoll events this connection's host stream should be watched for; None when it must
    /// not be watched at all (a hung-up stream would report EPOLLHUP forever).
    pub fn interest(&self) -> Option<EventSet> {
        let mut set = EventSet::empty();
        match self.state {
            ConnState::Killed | ConnState::Done => return None,
            _ if self.host_hup => return None,
            ConnState::Draining => return Some(EventSet::OUT),
            // Only hang-ups matter until the guest answers.
            ConnState::LocalInit => return Some(set),
            ConnState::Established => {}
        }
        if !self.host_readable
            && !self.host_eof
            && self.peer_shutdown & VSOCK_SHUTDOWN_RCV == 0
            && self.shutdown_sent & VSOCK_SHUTDOWN_SEND == 0
        {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() || !self.ctl_out.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Produce the next packet for the guest into `data` (the rx buffer's payload area).
    /// Returns None when nothing can be sent now.
    pub fn next_rx<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) -> Option<RxOp> {
        let op = self.next_rx_inner(data)?;
        // Every packet carries our fwd_cnt, so it doubles as a credit update.
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        self.pending_credit_update = false;
        Some(op)
    }

    fn next_rx_inner<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) -> Option<RxOp> {
        if let Some(rst) = self.take_rst() {
            return Some(rst);
        }
        if matches!(self.state, ConnState::Killed | ConnState::Done | ConnState::Draining) {
            return None;
        }
        if self.pending_request {
            self.pending_request = false;
            return Some(RxOp::control(VSOCK_OP_REQUEST));
        }
        if self.pending_response {
            self.pending_response = false;
            return Some(RxOp::control(VSOCK_OP_RESPONSE));
        }
        if self.wants_host_read() {
            let credit = self.peer_credit();
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some(RxOp::control(VSOCK_OP_CREDIT_REQUEST));
                }
            } else if let Some(op) = self.read_host(data, credit) {
                return Some(op);
            }
            // The read may have ended the connection (EOF of a host stream that is gone, a
            // read error). Its RST goes in this buffer: returning nothing would leave it queued
            // with no wakeup to come, since the host fd is no longer watched and an idle guest
            // kicks nothing (issue 11: stdin EOF lost after interactive use).
            if let Some(rst) = self.take_rst() {
                return Some(rst);
            }
        }
        if self.pending_shutdown != 0 {
            let flags = self.pending_shutdown;
            self.pending_shutdown = 0;
            return Some(RxOp { op: VSOCK_OP_SHUTDOWN, flags, len: 0 });
        }
        if self.pending_credit_update {
            return Some(RxOp::control(VSOCK_OP_CREDIT_UPDATE));
        }
        None
    }

    /// The RST owed to the guest, if any; sending it is the connection's last act.
    fn take_rst(&mut self) -> Option<RxOp> {
        if !self.pending_rst {
            return None;
        }
        self.pending_rst = false;
        self.state = ConnState::Done;
        Some(RxOp::control(VSOCK_OP_RST))
    }

    /// Read host bytes straight into the guest buffer.
    fn read_host<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>, credit: u32) -> Option<RxOp> {
        let data = data?;
        let max = (data.len() as u64).min(u64::from(credit)).min(u64::from(MAX_PKT_DATA)) as usize;
        if max == 0 {
            return None;
        }
        let mut buf = match data.subslice(0, max) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "bad guest rx buffer");
                return None;
            }
        };
        loop {
            match self.stream.read_volatile(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.host_readable = false;
                    self.host_closed_send();
                    return None;
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    return Some(RxOp { op: VSOCK_OP_RW, flags: 0, len: n as u32 });
                }
                Err(e) if io_kind(&e) == Some(ErrorKind::Interrupted) => continue,
                Err(e) if io_kind(&e) == Some(ErrorKind::WouldBlock) => {
                    self.host_readable = false;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "host vsock stream read failed");
                    self.kill();
                    return None;
                }
            }
        }
    }

    /// The host sent EOF: tell the guest it gets no more data; it may still write back unless
    /// the host side is finished too, in which case the connection ends with an RST (all host
    /// data is already on the rx ring ahead of it).
    fn host_closed_send(&mut self) {
        if self.host_write_shut || self.host_hup {
            self.kill();
            return;
        }
        if self.shutdown_sent & VSOCK_SHUTDOWN_SEND == 0 {
            self.shutdown_sent |= VSOCK_SHUTDOWN_SEND;
            self.pending_shutdown |= VSOCK_SHUTDOWN_SEND;
        }
    }
}

/// The I/O error kind inside a volatile-memory error, if it is one.
fn io_kind(e: &VolatileMemoryError) -> Option<ErrorKind> {
    match e {
        VolatileMemoryError::IOError(io) => Some(io.kind()),
        _ => None,
    }
}
