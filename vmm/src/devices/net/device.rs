//! The virtio-net [`VirtioDevice`]: features, config space, and activation, which configures
//! the tap from the acked features and hands the queues to a [`NetHandler`] on the `tern-net`
//! event loop.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::event_handler::NetHandler;
use super::tap::{tap_offload_flags, Tap, TapIo};
use super::{validate_params, NetError, NUM_QUEUES, QUEUE_SIZE, VNET_HDR_LEN};
use crate::devices::event_loop::EventLoopHandle;
use crate::devices::virtio::core::{DeviceCore, QueueDevice};
use crate::devices::virtio::{ActivateError, ActivatedQueue, InterruptSignal};
use crate::memory::GuestMemory;
use crate::metrics::NetMetrics;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// `struct virtio_net_config` up to `mtu`: `u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
/// le16 mtu`. Later fields (speed, duplex, RSS) read as zero.
const CONFIG_LEN: usize = 12;

/// Features offered, as Firecracker offers them, plus ECN both ways.
const AVAIL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_HOST_ECN);

/// A virtio-net device backed by a host tap.
pub struct Net {
    name: String,
    tap: Arc<dyn TapIo>,
    core: DeviceCore,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// A device on the tap `fd` (opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; the device
    /// keeps a non-blocking duplicate). `name` is the host tap's name, for logs and metrics;
    /// the guest gets `mac` and `mtu`. Its queues run on the loop behind `events`.
    pub fn new(name: &str, fd: &OwnedFd, mac: [u8; 6], mtu: u16, events: EventLoopHandle) -> Result<Net, NetError> {
        validate_params(&mac, mtu)?;
        Net::with_tap(name, Arc::new(Tap::new(fd)?), mac, mtu, events)
    }

    /// A device on any [`TapIo`] (the unit tests use a socket pair).
    pub fn with_tap(
        name: &str,
        tap: Arc<dyn TapIo>,
        mac: [u8; 6],
        mtu: u16,
        events: EventLoopHandle,
    ) -> Result<Net, NetError> {
        validate_params(&mac, mtu)?;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        // Only meaningful with VIRTIO_NET_F_STATUS (not offered): the link is always up.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Ok(Net {
            name: name.to_owned(),
            tap,
            core: DeviceCore::new(format!("virtio-net {name}"), &config, &QUEUE_SIZES, AVAIL_FEATURES, events),
            metrics: Arc::new(NetMetrics::new(name)),
        })
    }

    /// Count this device's packets, bytes, drops and kicks in `metrics` (from the VM's
    /// [`crate::metrics::VmMetrics::add_net_device`]).
    pub fn set_metrics(&mut self, metrics: Arc<NetMetrics>) {
        self.metrics = metrics;
    }

    /// Header size and offloads, from the features the driver acked.
    fn configure_tap(&self) -> Result<(), NetError> {
        self.tap.set_vnet_hdr_size(VNET_HDR_LEN as libc::c_int).map_err(NetError::VnetHdrSize)?;
        let flags = tap_offload_flags(self.core.acked_features());
        self.tap.set_offload(flags).map_err(|source| NetError::Offload { flags, source })
    }
}

impl QueueDevice for Net {
    const DEVICE_TYPE: u32 = VIRTIO_ID_NET;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn start(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptSignal>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = self.core.queues::<NUM_QUEUES>(queues)?;
        // The transport logs only this message, so it carries the cause.
        self.configure_tap().map_err(|e| match std::error::Error::source(&e) {
            Some(source) => ActivateError::Other(format!("{e}: {source}")),
            None => ActivateError::Other(e.to_string()),
        })?;
        let handler = NetHandler::new(
            &self.name,
            mem,
            interrupt,
            [rx.queue, tx.queue],
            [rx.kick, tx.kick],
            self.tap.clone(),
            self.core.acked_features(),
        )
        .with_metrics(self.metrics.clone());
        let stopped = handler.stop_flag();
        self.core.start(handler, stopped)?;
        tracing::debug!(
            device = %self.name,
            features = format_args!("{:#x}", self.core.acked_features()),
            offloads = format_args!("{:#x}", tap_offload_flags(self.core.acked_features())),
            "virtio-net device activated"
        );
        Ok(())
    }

    fn on_reset(&mut self) {
        // Until a driver acks offloads again, the tap must not queue frames that need them.
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!(device = %self.name, error = %e, "cannot clear the tap's offloads on reset");
        }
    }
}
