//! Length-prefixed frames: 4-byte big-endian length, then the body. The format is
//! `tern_change_records::frame`'s (the change-record stream uses the same frames); these wrap it
//! in [`ProtocolError`].

use crate::ProtocolError;
use std::io::{Read, Write};

/// Write `body` as one frame and flush.
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> Result<(), ProtocolError> {
    Ok(tern_change_records::frame::write_frame(w, body)?)
}

/// Read one frame. A clean EOF before the first byte is [`ProtocolError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, ProtocolError> {
    Ok(tern_change_records::frame::read_frame(r)?)
}
