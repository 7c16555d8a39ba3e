//! The serial console: vm-superio's 16550A model on the port-I/O bus, raising its
//! interrupt through an eventfd that KVM routes to GSI 4 (irqfd).

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::ConsoleWriter;
use crate::devices::bus::BusDevice;

/// Raises the serial interrupt by signalling the irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as the guest sees it. Input is not connected (the guest reads an empty FIFO).
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    /// A UART whose interrupt is `irq` (registered as an irqfd by the caller) and whose
    /// output goes to `output`.
    pub fn new(irq: EventFd, output: ConsoleWriter) -> Self {
        SerialConsole { uart: Serial::new(EventFdTrigger(irq), output) }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // Output errors are already absorbed by ConsoleWriter; an interrupt that cannot
            // be raised only delays the guest's driver, which polls as a fallback.
            if let Err(err) = self.uart.write(offset, *byte) {
                tracing::trace!("serial write at offset {offset}: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_raises_the_interrupt_and_rejects_wide_accesses() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::new(irq.try_clone().unwrap(), ConsoleWriter::discard());
        // IER: enable the transmitter-empty interrupt, then send a byte.
        serial.write(1, &[0x02]);
        serial.write(0, b"x");
        assert!(irq.read().unwrap() >= 1);
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        let mut wide = [0xaa_u8; 2];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0, 0]);
    }
}
