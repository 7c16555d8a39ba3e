//! The kernel command line: tern's defaults, one `virtio_mmio.device=` entry per device
//! (the guest kernel has no ACPI or device tree to find them otherwise), then the caller's
//! extra arguments, which may carry `-- <init args>`.

use linux_loader::cmdline::Cmdline;

use crate::layout::CMDLINE_CAPACITY;

/// Arguments every tern guest gets: a quiet serial console (each byte is a VM exit), resets
/// through the i8042 so the VMM sees them, no panic reboot loop, the legacy keyboard probed
/// as little as possible, and a trusted TSC.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 8250.nr_uarts=1 \
     i8042.noaux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check";

/// A virtio-mmio window for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceSlot {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

/// Errors assembling the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// The extra arguments hold a byte the kernel cannot take (only printable ASCII is allowed).
    #[error("kernel command line has a non-printable or non-ASCII character at byte {position}")]
    InvalidCharacter { position: usize },
    /// linux-loader rejected the command line.
    #[error("invalid kernel command line {0:?}")]
    Invalid(String, #[source] linux_loader::cmdline::Error),
    /// The whole command line does not fit in the kernel's buffer.
    #[error("kernel command line is {len} bytes, the limit is {limit}")]
    TooLong { len: usize, limit: usize },
}

/// Build the full command line.
pub fn build_cmdline(devices: &[MmioDeviceSlot], extra: &str) -> Result<Cmdline, CmdlineError> {
    let mut text = String::from(DEFAULT_CMDLINE);
    for device in devices {
        text.push_str(&format!(" virtio_mmio.device={}K@0x{:x}:{}", device.size / 1024, device.base, device.irq));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        text.push(' ');
        text.push_str(extra);
    }
    if let Some(position) = text.bytes().position(|byte| !(b' '..=b'~').contains(&byte)) {
        return Err(CmdlineError::InvalidCharacter { position });
    }
    // One byte of the buffer holds the terminating NUL.
    let limit = CMDLINE_CAPACITY - 1;
    if text.len() > limit {
        return Err(CmdlineError::TooLong { len: text.len(), limit });
    }
    Cmdline::try_from(&text, CMDLINE_CAPACITY).map_err(|err| CmdlineError::Invalid(text, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_string(cmdline: &Cmdline) -> String {
        cmdline.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn defaults_devices_then_extra() {
        let devices = [
            MmioDeviceSlot { base: 0xd000_0000, size: 0x1000, irq: 5 },
            MmioDeviceSlot { base: 0xd000_1000, size: 0x1000, irq: 6 },
        ];
        let cmdline = build_cmdline(&devices, " init=/init ").unwrap();
        assert_eq!(
            as_string(&cmdline),
            format!(
                "{DEFAULT_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 \
                 virtio_mmio.device=4K@0xd0001000:6 init=/init"
            )
        );
    }

    #[test]
    fn keeps_init_arguments_last() {
        let cmdline = build_cmdline(&[], "loglevel=8 -- --verbose").unwrap();
        assert!(as_string(&cmdline).ends_with("loglevel=8 -- --verbose"));
    }

    #[test]
    fn rejects_overlong_and_invalid_lines() {
        let long = "x".repeat(CMDLINE_CAPACITY);
        assert!(matches!(build_cmdline(&[], &long), Err(CmdlineError::TooLong { .. })));
        assert!(matches!(build_cmdline(&[], "bad\u{7}char"), Err(CmdlineError::InvalidCharacter { .. })));
        assert!(matches!(build_cmdline(&[], "nul\0byte"), Err(CmdlineError::InvalidCharacter { .. })));
    }

    #[test]
    fn fits_exactly_at_the_limit() {
        let room = CMDLINE_CAPACITY - 1 - DEFAULT_CMDLINE.len() - 1;
        let cmdline = build_cmdline(&[], &"y".repeat(room)).unwrap();
        assert_eq!(as_string(&cmdline).len(), CMDLINE_CAPACITY - 1);
    }
}
