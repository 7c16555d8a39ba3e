//! The legacy PC devices a Linux guest needs on x86: the 16550A serial console at COM1 and
//! the i8042 command port, used only for its CPU-reset command.

mod console;
mod i8042;
mod serial;

pub use console::{ConsoleTail, ConsoleWriter, TAIL_BYTES};
pub use i8042::I8042ResetPort;
pub use serial::SerialConsole;

/// COM1's first port.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports a 16550A occupies.
pub const COM1_PORT_COUNT: u64 = 8;
/// COM1's ISA interrupt line (also its GSI with the in-kernel irqchip).
pub const COM1_IRQ: u32 = 4;
/// The i8042 data port; the command/status port is `I8042_DATA_PORT + 4` (0x64).
pub const I8042_DATA_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_COUNT: u64 = 5;
