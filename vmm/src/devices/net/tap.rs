//! The host tap as the device uses it: non-blocking frame reads and writes on an fd someone else
//! opened, and the two ioctls activation needs. [`TapIo`] is the seam: [`Tap`] is the real fd,
//! the unit tests put a socket pair behind the same reads and writes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use libc::{c_int, c_ulong};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
};
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};

use super::NetError;

/// What the device needs from its tap. Reads and writes move one frame (header included) and
/// never block: they fail with `WouldBlock` instead.
pub trait TapIo: Send + Sync {
    /// The fd to poll for readability.
    fn raw_fd(&self) -> RawFd;
    /// Read one frame into `buf`; returns its length.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame; returns the bytes written.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// `TUNSETVNETHDRSZ`: the size of the header before every frame.
    fn set_vnet_hdr_size(&self, size: c_int) -> io::Result<()>;
    /// `TUNSETOFFLOAD`: which offloaded (`TUN_F_*`) frames the tap may hand us.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// A tap fd (opened by the host side with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Take a duplicate of `fd` and make it non-blocking (the flag is shared with `fd`: both
    /// name one open file).
    pub fn new(fd: &OwnedFd) -> Result<Tap, NetError> {
        let fd = fd.try_clone().map_err(NetError::DupFd)?;
        set_nonblocking(&fd).map_err(NetError::NonBlocking)?;
        Ok(Tap { file: File::from(fd) })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own; it takes no argument and touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL on an fd we own, with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl TapIo for Tap {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    fn set_vnet_hdr_size(&self, size: c_int) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which outlives the call;
        // the fd is ours and the result is checked.
        let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ as c_ulong, &size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value, so no memory is passed; the fd is
        // ours and the result is checked.
        let ret = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as c_ulong, c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The `TUN_F_*` offloads for `TUNSETOFFLOAD`, from the features the guest *acked*: each tells
/// the tap which frames it may hand the guest, so each follows a `GUEST_*` feature (what the
/// guest can receive), never a `HOST_*` one or `VIRTIO_NET_F_CSUM` (what the guest sends).
///
/// The kernel's `set_offload` (drivers/net/tun.c) refuses (EINVAL) segmentation offloads
/// without `TUN_F_CSUM` and ECN without TSO, so those combinations are left out, as virtio 1.2
/// (5.1.3.1) also requires of the driver.
pub fn tap_offload_flags(acked_features: u64) -> u32 {
    let acked = |bit: u32| acked_features & (1u64 << bit) != 0;
    if !acked(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if acked(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if acked(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if acked(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}
