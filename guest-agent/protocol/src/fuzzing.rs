//! The harness of the `agent_frame` fuzz target (`fuzz/`, feature `fuzzing`), also run over the
//! committed corpus by this crate's unit tests.
//!
//! The input is a byte stream as it arrives on a vsock connection: length-prefixed frames read
//! one after another until an error, each decoded as the agent decodes what it reads (a
//! [`Request`] on the RPC port, a [`StreamHello`] on the stream port, a change batch on the watch
//! port) and as the runtime decodes the agent's replies ([`Response`]). Nothing may panic, no
//! frame may be longer than [`MAX_FRAME_LEN`], and a decoded message must encode and decode to
//! itself.

use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::watch::ChangeBatch;
use crate::{frame, recv, send, ProtocolError, Request, Response, StreamHello, MAX_FRAME_LEN};

/// A message decoded from a frame must survive a send and a receive unchanged.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let mut wire = Vec::new();
    send(&mut wire, msg).unwrap_or_else(|e| panic!("cannot re-encode {msg:?}: {e}"));
    let again: T = recv(&mut Cursor::new(&wire)).unwrap_or_else(|e| panic!("cannot decode {msg:?} re-encoded: {e}"));
    assert_eq!(&again, msg, "a message changed on its way through the wire");
}

/// Decode `data` as a stream of frames, every way either side reads them.
pub fn frames(data: &[u8]) {
    let mut stream = Cursor::new(data);
    loop {
        let start = stream.position() as usize;
        let body = match frame::read_frame(&mut stream) {
            Ok(body) => body,
            Err(ProtocolError::Closed) => break,
            Err(_) => break,
        };
        assert!(body.len() <= MAX_FRAME_LEN);
        assert_eq!(stream.position() as usize, start + 4 + body.len(), "a frame read more or less than it said");
        // Each side's decoder, on the frame as it came.
        for decode in [decode_as::<Request>, decode_as::<Response>, decode_as::<StreamHello>, decode_as::<ChangeBatch>]
        {
            decode(&data[start..start + 4 + body.len()]);
        }
    }
}

fn decode_as<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(frame: &[u8]) {
    if let Ok(msg) = recv::<T, _>(&mut Cursor::new(frame)) {
        round_trip(&msg);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// The committed corpus (`fuzz/corpus/agent_frame/`), replayed by `cargo test`.
    #[test]
    fn committed_corpus_replays_without_a_failure() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/agent_frame");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            super::frames(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }
}
