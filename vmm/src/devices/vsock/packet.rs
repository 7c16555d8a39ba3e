//! Vsock wire constants and the small layer on top of `virtio_vsock::packet::VsockPacket`:
//! an owned copy of a guest header (so nothing re-reads guest memory after validation) and a
//! writer for the headers the device puts on the rx queue.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The host's well-known CID.
pub const VSOCK_HOST_CID: u64 = 2;
/// The only socket type tern supports.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Connection request.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// Connection reset (refused, or torn down).
pub const VSOCK_OP_RST: u16 = 3;
/// The sender will no longer send and/or receive (see the flags).
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const VSOCK_OP_RW: u16 = 5;
/// The sender's buf_alloc/fwd_cnt, unsolicited or in reply to a credit request.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// The sender asks for a credit update.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const VSOCK_SHUTDOWN_BOTH: u32 = VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND;

/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Size of the packet header in bytes.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// A packet header copied out of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Copy the header of a validated tx packet.
    pub fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Write this header into an rx packet (which zeroes any stale header bytes first).
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) -> Result<(), virtio_vsock::packet::Error> {
        pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE])?;
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
        Ok(())
    }
}

/// What a connection (or the muxer) wants to put on the rx queue; the muxer fills in the
/// addressing and credit fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxOp {
    pub op: u16,
    pub flags: u32,
    /// Payload bytes already written into the packet's data buffer (RW only).
    pub len: u32,
}

impl RxOp {
    /// A control packet without payload.
    pub fn control(op: u16) -> Self {
        RxOp { op, flags: 0, len: 0 }
    }
}
