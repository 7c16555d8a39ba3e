//! The i8042 keyboard controller, reduced to what a guest without a keyboard needs: the
//! status port reads as idle, and the CPU-reset command (0xFE to port 0x64, which Linux
//! sends for `reboot=k`) ends the VM.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;

/// Called when the guest pulses the reset line.
pub struct ResetLine(Box<dyn Fn() + Send>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// Ports 0x60..=0x64 on the port-I/O bus.
pub struct I8042ResetPort {
    controller: I8042Device<ResetLine>,
}

impl I8042ResetPort {
    /// `on_reset` runs on the vCPU thread that wrote the reset command.
    pub fn new(on_reset: impl Fn() + Send + 'static) -> Self {
        I8042ResetPort { controller: I8042Device::new(ResetLine(Box::new(on_reset))) }
    }
}

impl BusDevice for I8042ResetPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest's `kb_wait`
        // before the reset command does not spin.
        data.fill(self.controller.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let Ok(()) = self.controller.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_on_the_command_port_triggers() {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut port = I8042ResetPort::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut status = [0xffu8];
        port.read(4, &mut status);
        assert_eq!(status, [0]);
        port.write(0, &[0xfe]);
        port.write(4, &[0xaa]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        port.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
