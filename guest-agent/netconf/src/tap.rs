//! Tap devices: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not persistent, so a
//! tap lives exactly as long as its last file descriptor.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::NetError;

/// The tun/tap control device.
pub(crate) const TUN_PATH: &str = "/dev/net/tun";
/// The virtio-net header the VMM exchanges with the tap: `virtio_net_hdr_v1`, 12 bytes (virtio
/// 1.0 always has `num_buffers`).
pub(crate) const VNET_HDR_LEN: libc::c_int = 12;

/// Create tap `name` in the calling thread's network namespace and return its descriptor
/// (non-blocking, close-on-exec). Fails if a device of that name already exists.
pub(crate) fn create_tap(name: &str) -> Result<OwnedFd, NetError> {
    let fail = |source: std::io::Error| NetError::CreateTap { name: name.to_owned(), source };
    if name.len() >= libc::IFNAMSIZ {
        return Err(fail(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    // The namespace the tap lands in is the opener's at open time.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { NetError::TunMissing } else { fail(e) })?;

    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // IFF_TUN_EXCL: never attach to a device someone else made under that name.
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and updates) the ifreq, a valid exclusively borrowed value for
    // the duration of the call; `file` is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    let header_len: libc::c_int = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
    if rc < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_tap_names_are_refused_before_any_syscall() {
        let err = create_tap("tap0123456789_tern").unwrap_err();
        assert!(matches!(err, NetError::CreateTap { .. }), "{err}");
    }
}
