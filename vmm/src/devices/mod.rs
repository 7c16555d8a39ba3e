//! Devices the guest sees: the MMIO/port-I/O buses, the legacy PC devices (serial console,
//! i8042 reset line), the virtio-mmio transport with its devices, and the event loops that
//! run device work off the vCPU threads.

pub mod bus;
pub mod event_loop;
pub mod fs;
pub mod legacy;
pub mod net;
pub mod virtio;
pub mod vsock;
