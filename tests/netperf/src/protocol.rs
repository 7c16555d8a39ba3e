//! The wire protocol. A connection's first byte is its [`Mode`]; what follows depends on it
//! (integers little-endian):
//!
//! - [`Mode::Sink`]: the client writes until it shuts down its side; the server then replies
//!   with the bytes it read (`u64`) and closes.
//! - [`Mode::Source`]: the client sends a duration in milliseconds (`u64`, at most
//!   [`MAX_DURATION`]); the server writes [`BUFFER_LEN`] buffers until it has passed, then closes.
//! - [`Mode::Echo`]: the client sends a message size (`u32`, 1 to [`MAX_ECHO_SIZE`]), then
//!   messages of that size; the server writes each one back, until the client closes.
//! - [`Mode::Stop`]: the server replies with the mode byte and its process exits.

use std::time::Duration;

/// Size of every write of a throughput test, and of the readers' buffers.
pub const BUFFER_LEN: usize = 128 * 1024;
/// Longest throughput test; longer requests are refused.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Largest echo message; larger requests are refused.
pub const MAX_ECHO_SIZE: u32 = 1 << 20;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sink,
    Source,
    Echo,
    Stop,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Sink, Mode::Source, Mode::Echo, Mode::Stop];

    pub fn byte(self) -> u8 {
        match self {
            Mode::Sink => b's',
            Mode::Source => b'r',
            Mode::Echo => b'e',
            Mode::Stop => b'q',
        }
    }

    pub fn from_byte(byte: u8) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.byte() == byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_round_trips_through_its_byte() {
        for mode in Mode::ALL {
            assert_eq!(Mode::from_byte(mode.byte()), Some(mode));
        }
        assert_eq!(Mode::from_byte(0), None);
    }
}
