//! virtio-net over a host tap, after Firecracker's `devices/virtio/net/`.
//!
//! The host side (not this module) opens `/dev/net/tun` inside the pod's netns with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and hands the VMM the fd. On activation the device sets
//! the tap's vnet header size to [`VNET_HDR_LEN`] (`virtio_net_hdr_v1`) and its offloads from
//! the features the guest acked ([`tap_offload_flags`]); frames then cross the tap with the same
//! 12-byte header the guest uses, unchanged.
//!
//! - RX (tap → guest): the tap is read only while the guest has rx buffers posted. Without
//!   them, a frame already read waits in the handler and the tap leaves the epoll set until the
//!   next RX kick, so an idle guest never makes the loop spin. Frames are spread over several
//!   buffers with `VIRTIO_NET_F_MRG_RXBUF`; one larger than the guest can ever hold is dropped
//!   and counted.
//! - TX (guest → tap): every chain is checked ([`event_handler::ChainError`]), gathered and
//!   written with one `write(2)`. A frame the tap refuses is dropped and counted, never retried;
//!   a bad chain fails alone.
//!
//! Layout: [`device`] (the `VirtioDevice`: features, config space, activation), [`event_handler`]
//! (the queues on the `tern-net` event loop), [`tap`] (the fd and its ioctls).

mod device;
pub mod event_handler;
pub mod tap;

pub use device::Net;

/// Size of `struct virtio_net_hdr_v1`: the header before every frame, both ways (with
/// `VIRTIO_F_VERSION_1` it is 12 bytes whether or not `VIRTIO_NET_F_MRG_RXBUF` is acked).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame after the header: a 64 KiB GSO frame plus its Ethernet header, as Firecracker.
pub const MAX_FRAME_LEN: usize = 65_550;
/// Largest header plus frame, in either direction.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Queue size of the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queues: one rx/tx pair.
pub const NUM_QUEUES: usize = 2;
/// Smallest MTU the device accepts (the IPv4 minimum).
pub const MIN_MTU: u16 = 68;

/// Errors creating or activating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address is all zeros or a multicast address.
    #[error("MAC address {0} is not a unicast address")]
    InvalidMac(String),
    /// The MTU is below [`MIN_MTU`].
    #[error("MTU {0} is below {MIN_MTU}")]
    InvalidMtu(u16),
    /// The tap fd could not be duplicated for the device.
    #[error("cannot duplicate the tap fd")]
    DupFd(#[source] std::io::Error),
    /// The tap fd could not be made non-blocking.
    #[error("cannot make the tap fd non-blocking")]
    NonBlocking(#[source] std::io::Error),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the tap's vnet header size")]
    VnetHdrSize(#[source] std::io::Error),
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot set the tap's offloads to {flags:#x}")]
    Offload {
        flags: u32,
        #[source]
        source: std::io::Error,
    },
}

/// `aa:bb:cc:dd:ee:ff`, for messages.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Check a device's MAC and MTU: the guest must get a unicast MAC and a usable MTU.
pub fn validate_params(mac: &[u8; 6], mtu: u16) -> Result<(), NetError> {
    if *mac == [0; 6] || mac[0] & 1 != 0 {
        return Err(NetError::InvalidMac(format_mac(mac)));
    }
    if mtu < MIN_MTU {
        return Err(NetError::InvalidMtu(mtu));
    }
    Ok(())
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;
