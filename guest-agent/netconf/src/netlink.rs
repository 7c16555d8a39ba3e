//! The synchronous rtnetlink request helper the host and the guest share: one socket, one
//! request at a time, the answers read until the kernel's ACK (or DONE, for a dump).
//!
//! A netlink socket belongs to the network namespace its creator was in when it was opened, so
//! the host side opens one only after entering the pod's namespace.

use netlink_packet_core::{
    parse_string, NetlinkBuffer, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::NetError;

/// The kernel always answers; this only keeps a bug from hanging the caller forever.
const RECV_TIMEOUT_SECS: i64 = 10;
/// Most messages one dump may return (a pod has a handful of links, routes and filters).
pub(crate) const MAX_DUMP_MESSAGES: usize = 65_536;
/// Most datagrams read for one request before giving up on its end.
const MAX_DATAGRAMS: usize = 65_536;
/// Largest datagram accepted (the kernel's dump datagrams are at most a few pages).
const MAX_DATAGRAM_LEN: usize = 1 << 20;
/// A dump the kernel marks inconsistent (`NLM_F_DUMP_INTR`: the table changed meanwhile) is
/// repeated this many times at most.
const DUMP_ATTEMPTS: usize = 3;
/// `NLMSGERR_ATTR_MSG`: the extended ack's human-readable text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// A route-netlink socket in the calling thread's network namespace.
pub(crate) struct Rtnl {
    socket: Socket,
    seq: u32,
}

/// What one request brought back.
struct Answer {
    messages: Vec<RouteNetlinkMessage>,
    interrupted: bool,
}

impl Rtnl {
    /// Open a socket in the current thread's network namespace.
    pub(crate) fn open() -> Result<Self, NetError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetError::Socket)?;
        socket.bind_auto().map_err(NetError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(NetError::Socket)?;
        // Best effort: older kernels lack them, and they only improve error messages.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        setsockopt(&socket, ReceiveTimeout, &TimeVal::seconds(RECV_TIMEOUT_SECS))
            .map_err(|e| NetError::Socket(e.into()))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// A change (`NLM_F_REQUEST | NLM_F_ACK | flags`): Ok once the kernel acknowledges it.
    pub(crate) fn change(&mut self, message: RouteNetlinkMessage, flags: u16, what: &str) -> Result<(), NetError> {
        self.transact(message, NLM_F_REQUEST | NLM_F_ACK | flags, what).map(drop)
    }

    /// A change whose `allowed` errno counts as done (EEXIST for "already there", ENOENT for
    /// "already gone").
    pub(crate) fn change_allowing(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        allowed: &[Errno],
        what: &str,
    ) -> Result<(), NetError> {
        match self.change(message, flags, what) {
            Err(e) if e.errno().is_some_and(|errno| allowed.contains(&errno)) => Ok(()),
            other => other,
        }
    }

    /// A single get (not a dump): the kernel's answers before its ACK.
    pub(crate) fn get(
        &mut self,
        message: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        self.transact(message, NLM_F_REQUEST | NLM_F_ACK, what).map(|a| a.messages)
    }

    /// A dump: every message until DONE, repeated if the kernel says the table changed
    /// meanwhile.
    pub(crate) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        let mut attempt = 1;
        loop {
            let answer = self.transact(message.clone(), NLM_F_REQUEST | NLM_F_DUMP, what)?;
            if !answer.interrupted || attempt >= DUMP_ATTEMPTS {
                return Ok(answer.messages);
            }
            tracing::debug!(what, attempt, "netlink dump interrupted; repeating it");
            attempt += 1;
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn transact(&mut self, message: RouteNetlinkMessage, flags: u16, what: &str) -> Result<Answer, NetError> {
        let seq = self.next_seq();
        let request = encode(message, flags, seq);
        let io_error = |source| NetError::Io { what: what.to_owned(), source };
        let sent = self.socket.send(&request, 0).map_err(io_error)?;
        if sent != request.len() {
            return Err(protocol(what, format!("sent {sent} of {} bytes", request.len())));
        }

        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answer = Answer { messages: Vec::new(), interrupted: false };
        let mut datagram = Vec::new();
        for _ in 0..MAX_DATAGRAMS {
            self.recv_datagram(&mut datagram).map_err(io_error)?;
            if let Some(done) = read_datagram(&datagram, seq, is_dump, what, &mut answer)? {
                return done.map(|()| answer);
            }
        }
        Err(protocol(what, format!("no end after {MAX_DATAGRAMS} datagrams")))
    }

    /// Read one whole datagram into `buf`, sized by a peek first.
    fn recv_datagram(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let mut probe: Vec<u8> = Vec::new();
        let len = self.socket.recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        if len > MAX_DATAGRAM_LEN {
            return Err(std::io::Error::other(format!(
                "a {len}-byte netlink datagram is over the {MAX_DATAGRAM_LEN}-byte limit"
            )));
        }
        buf.clear();
        buf.reserve(len.max(NLMSG_HDRLEN));
        let got = self.socket.recv(buf, libc::MSG_TRUNC)?;
        if got > buf.len() {
            return Err(std::io::Error::other("netlink datagram truncated"));
        }
        Ok(())
    }
}

/// One request, ready to send.
fn encode(message: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut packet = NetlinkMessage::from(message);
    packet.header.flags = flags;
    packet.header.sequence_number = seq;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

fn protocol(what: &str, problem: String) -> NetError {
    NetError::Protocol { what: what.to_owned(), problem }
}

/// Walk the messages of one datagram. `Some(result)` once the request's answer is complete.
fn read_datagram(
    data: &[u8],
    seq: u32,
    is_dump: bool,
    what: &str,
    answer: &mut Answer,
) -> Result<Option<Result<(), NetError>>, NetError> {
    let mut offset = 0;
    while offset < data.len() {
        let rest = &data[offset..];
        let header =
            NetlinkBuffer::new_checked(rest).map_err(|source| NetError::Decode { what: what.to_owned(), source })?;
        let len = header.length() as usize;
        let (msg_seq, msg_flags) = (header.sequence_number(), header.flags());
        // Messages are 4-byte aligned; the last one of a datagram may lack the padding.
        offset = offset.saturating_add((len + 3) & !3);
        if msg_seq != seq {
            tracing::debug!(what, msg_seq, seq, "skipping a stale netlink message");
            continue;
        }
        if msg_flags & NLM_F_DUMP_INTR != 0 {
            answer.interrupted = true;
        }
        let bytes = &rest[..len];
        let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) {
            Ok(message) => message,
            // One odd entry (an attribute this crate version cannot parse) should not make a
            // whole dump fail; the ones we act on are plain.
            Err(source) if is_dump => {
                tracing::warn!(what, error = %source, "skipping an undecodable netlink message");
                continue;
            }
            Err(source) => return Err(NetError::Decode { what: what.to_owned(), source }),
        };
        match message.payload {
            NetlinkPayload::Error(e) => {
                let Some(code) = e.code else {
                    // The ACK.
                    return Ok(Some(Ok(())));
                };
                return Ok(Some(Err(NetError::Netlink {
                    what: what.to_owned(),
                    errno: Errno::from_raw(code.get().saturating_neg()),
                    kernel_message: ext_ack_message(msg_flags, &e.header),
                })));
            }
            NetlinkPayload::Done(done) => {
                if done.code != 0 {
                    return Ok(Some(Err(NetError::Netlink {
                        what: what.to_owned(),
                        errno: Errno::from_raw(done.code.saturating_neg()),
                        kernel_message: None,
                    })));
                }
                return Ok(Some(Ok(())));
            }
            NetlinkPayload::InnerMessage(inner) => {
                if answer.messages.len() >= MAX_DUMP_MESSAGES {
                    return Err(protocol(what, format!("over {MAX_DUMP_MESSAGES} messages")));
                }
                answer.messages.push(inner);
            }
            NetlinkPayload::Overrun(_) => return Err(protocol(what, "the kernel reported an overrun".into())),
            _ => {}
        }
    }
    Ok(None)
}

/// The text of an extended ACK (`NLMSGERR_ATTR_MSG`), from the bytes after an error's code: the
/// request's header (all of the request unless the ack was capped), then the TLVs.
fn ext_ack_message(flags: u16, after_code: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let request_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = after_code.get(..4)?;
        u32::from_ne_bytes(len.try_into().ok()?) as usize
    };
    let tlvs = after_code.get((request_len + 3) & !3..)?;
    NlasIterator::new(tlvs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .and_then(|nla| parse_string(nla.value()).ok())
        .map(|s| s.trim_end_matches('\0').to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{ErrorMessage, NetlinkHeader, NLM_F_MULTIPART};
    use netlink_packet_route::link::LinkMessage;

    fn datagram(messages: Vec<NetlinkMessage<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut out = Vec::new();
        for mut m in messages {
            m.finalize();
            let mut buf = vec![0; m.buffer_len()];
            m.serialize(&mut buf);
            out.extend_from_slice(&buf);
        }
        out
    }

    fn with_seq(
        payload: NetlinkPayload<RouteNetlinkMessage>,
        seq: u32,
        flags: u16,
    ) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        NetlinkMessage::new(header, payload)
    }

    fn error(code: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        e.header = vec![0; NLMSG_HDRLEN];
        NetlinkPayload::Error(e)
    }

    #[test]
    fn requests_carry_the_flags_and_sequence_number() {
        let bytes = encode(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_REQUEST | NLM_F_DUMP, 7);
        let buf = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(buf.length() as usize, bytes.len());
        assert_eq!(buf.sequence_number(), 7);
        assert_eq!(buf.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(buf.message_type(), 18); // RTM_GETLINK
    }

    #[test]
    fn a_negative_error_code_becomes_the_errno_and_names_the_operation() {
        let data = datagram(vec![with_seq(error(-libc::EEXIST), 3, 0)]);
        let mut answer = Answer { messages: vec![], interrupted: false };
        let end = read_datagram(&data, 3, false, "add route", &mut answer).unwrap().unwrap();
        let err = end.unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST));
        assert_eq!(err.to_string(), "cannot add route");
    }

    #[test]
    fn stale_answers_are_skipped_and_the_ack_ends_the_request() {
        let data = datagram(vec![with_seq(error(-libc::ENOENT), 2, 0), with_seq(error(0), 3, 0)]);
        let mut answer = Answer { messages: vec![], interrupted: false };
        let end = read_datagram(&data, 3, false, "x", &mut answer).unwrap().unwrap();
        assert!(end.is_ok());
    }

    #[test]
    fn a_dump_collects_until_done_and_notes_interruptions() {
        let link = || NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(LinkMessage::default()));
        let first = datagram(vec![
            with_seq(link(), 5, NLM_F_MULTIPART),
            with_seq(link(), 5, NLM_F_MULTIPART | NLM_F_DUMP_INTR),
        ]);
        let mut answer = Answer { messages: vec![], interrupted: false };
        assert!(read_datagram(&first, 5, true, "x", &mut answer).unwrap().is_none());
        let done = datagram(vec![with_seq(NetlinkPayload::Done(Default::default()), 5, NLM_F_MULTIPART)]);
        let end = read_datagram(&done, 5, true, "x", &mut answer).unwrap().unwrap();
        assert!(end.is_ok());
        assert_eq!(answer.messages.len(), 2);
        assert!(answer.interrupted);
    }

    #[test]
    fn the_extended_ack_text_is_read_after_a_capped_header() {
        // header (16 bytes), then NLMSGERR_ATTR_MSG "bad mtu\0" as a TLV.
        let mut after_code = vec![0u8; NLMSG_HDRLEN];
        let text = b"bad mtu\0";
        after_code.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        after_code.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        after_code.extend_from_slice(text);
        let msg = ext_ack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &after_code);
        assert_eq!(msg.as_deref(), Some("bad mtu"));
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &after_code), None);
        // A truncated payload yields nothing rather than a panic.
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &[1, 2]), None);
    }
}
