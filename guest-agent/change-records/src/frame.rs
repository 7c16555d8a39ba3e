//! Length-prefixed frames: 4-byte big-endian length, then the body.

use std::io::{ErrorKind, Read, Write};

/// Largest frame body accepted either way.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("peer closed the connection")]
    Closed,
}

/// Write `body` as one frame and flush.
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// Read one frame. A clean EOF before the first byte is [`FrameError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let bytes = u32::MAX.to_be_bytes();
        assert!(matches!(read_frame(&mut &bytes[..]), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let bytes = [0u8, 0, 0, 10, b'a'];
        assert!(matches!(read_frame(&mut &bytes[..]), Err(FrameError::Io(_))));
    }

    #[test]
    fn empty_input_is_closed() {
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
    }
}
