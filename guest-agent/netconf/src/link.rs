//! Links and addresses over rtnetlink: what both halves read, and the changes they make.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkLayerType, LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use std::net::{IpAddr, Ipv4Addr};
use tern_protocol::net::IpPrefix;

use crate::netlink::Rtnl;
use crate::NetError;

/// Longest interface name the kernel accepts (`IFNAMSIZ` less the NUL).
pub(crate) const MAX_IFNAME_LEN: usize = 15;

/// One network interface, as a link dump describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// `None` unless the hardware address is a 6-byte (Ethernet) one.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub flags: LinkFlags,
    pub link_layer_type: LinkLayerType,
}

impl Link {
    fn from_message(message: LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut mac = None;
        let mut mtu = 0;
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = m,
                _ => {}
            }
        }
        Some(Link {
            index: message.header.index,
            name: name?,
            mac,
            mtu,
            flags: message.header.flags,
            link_layer_type: message.header.link_layer_type,
        })
    }

    pub(crate) fn is_loopback(&self) -> bool {
        self.flags.contains(LinkFlags::Loopback) || self.link_layer_type == LinkLayerType::Loopback
    }

    pub(crate) fn is_up(&self) -> bool {
        self.flags.contains(LinkFlags::Up)
    }
}

/// Every link of the namespace.
pub(crate) fn list_links(rtnl: &mut Rtnl) -> Result<Vec<Link>, NetError> {
    let messages = rtnl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), "list the network interfaces")?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Link::from_message(link),
            _ => None,
        })
        .collect())
}

/// The link called `name`, if there is one.
pub(crate) fn link_by_name(rtnl: &mut Rtnl, name: &str) -> Result<Option<Link>, NetError> {
    let mut message = LinkMessage::default();
    message.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match rtnl.get(RouteNetlinkMessage::GetLink(message), &format!("look up interface {name}")) {
        Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Link::from_message(link),
            _ => None,
        })),
        Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A change to link `index` (flags, MTU or name).
fn set_link(
    rtnl: &mut Rtnl,
    index: u32,
    up: Option<bool>,
    attribute: Option<LinkAttribute>,
    what: &str,
) -> Result<(), NetError> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    if let Some(up) = up {
        message.header.change_mask = LinkFlags::Up;
        if up {
            message.header.flags = LinkFlags::Up;
        }
    }
    message.attributes.extend(attribute);
    rtnl.change(RouteNetlinkMessage::SetLink(message), 0, what)
}

/// Bring interface `name` (index `index`) up or down.
pub(crate) fn set_up(rtnl: &mut Rtnl, index: u32, name: &str, up: bool) -> Result<(), NetError> {
    let what = format!("bring interface {name} {}", if up { "up" } else { "down" });
    set_link(rtnl, index, Some(up), None, &what)
}

/// Set the MTU of interface `name`.
pub(crate) fn set_mtu(rtnl: &mut Rtnl, index: u32, name: &str, mtu: u32) -> Result<(), NetError> {
    let what = format!("set MTU {mtu} on interface {name}");
    set_link(rtnl, index, None, Some(LinkAttribute::Mtu(mtu)), &what)
}

/// Keep the kernel from giving interface `name` an IPv6 link-local address (and so from sending
/// router solicitations and DAD probes through it): for a tap that only carries the guest's
/// frames. Must happen before the interface comes up.
pub(crate) fn disable_ipv6_autoconf(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetError> {
    let what = format!("turn off IPv6 address generation on interface {name}");
    let spec =
        LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]);
    set_link(rtnl, index, None, Some(spec), &what)
}

/// Rename interface `from` (which must be down) to `to`.
pub(crate) fn rename(rtnl: &mut Rtnl, index: u32, from: &str, to: &str) -> Result<(), NetError> {
    let what = format!("rename interface {from} to {to}");
    set_link(rtnl, index, None, Some(LinkAttribute::IfName(to.to_owned())), &what)
}

/// Delete interface `name`; one that is already gone is fine.
pub(crate) fn delete_link(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetError> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    rtnl.change_allowing(
        RouteNetlinkMessage::DelLink(message),
        0,
        &[Errno::ENODEV],
        &format!("delete interface {name}"),
    )
}

/// One address of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Address {
    pub index: u32,
    pub prefix: IpPrefix,
}

/// Every address of the namespace, IPv4 and IPv6.
pub(crate) fn list_addresses(rtnl: &mut Rtnl) -> Result<Vec<Address>, NetError> {
    let messages = rtnl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), "list the addresses")?;
    let mut addresses = Vec::new();
    for message in messages {
        let RouteNetlinkMessage::NewAddress(message) = message else {
            continue;
        };
        let mut local = None;
        let mut address = None;
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
        // point-to-point link, and the only one an IPv6 address usually has.
        if let Some(addr) = local.or(address) {
            addresses.push(Address {
                index: message.header.index,
                prefix: IpPrefix { addr, prefix_len: message.header.prefix_len },
            });
        }
    }
    Ok(addresses)
}

/// Whether an address is IPv6 link-local (`fe80::/10`), which the guest derives by itself.
pub(crate) fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The RTM_NEWADDR message for `prefix` on link `index`.
pub(crate) fn address_message(index: u32, prefix: &IpPrefix) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.prefix_len = prefix.prefix_len;
    message.header.scope = AddressScope::Universe;
    message.attributes.push(AddressAttribute::Local(prefix.addr));
    message.attributes.push(AddressAttribute::Address(prefix.addr));
    match prefix.addr {
        IpAddr::V4(v4) => {
            message.header.family = AddressFamily::Inet;
            if let Some(broadcast) = ipv4_broadcast(v4, prefix.prefix_len) {
                message.attributes.push(AddressAttribute::Broadcast(broadcast));
            }
        }
        IpAddr::V6(_) => {
            message.header.family = AddressFamily::Inet6;
            // The address already passed duplicate address detection on the pod's interface,
            // which the guest NIC stands in for; DAD again would only delay it by seconds.
            message.header.flags = AddressHeaderFlags::Nodad;
        }
    }
    message
}

/// The broadcast address of a v4 subnet; none for /31 and /32.
fn ipv4_broadcast(addr: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    if prefix_len >= 31 {
        return None;
    }
    let host_mask = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
    Some(Ipv4Addr::from(u32::from(addr) | host_mask))
}

/// Add `prefix` to interface `name`; an address that is already there is fine.
pub(crate) fn add_address(rtnl: &mut Rtnl, index: u32, name: &str, prefix: &IpPrefix) -> Result<(), NetError> {
    rtnl.change_allowing(
        RouteNetlinkMessage::NewAddress(address_message(index, prefix)),
        NLM_F_CREATE | NLM_F_EXCL,
        &[Errno::EEXIST],
        &format!("add address {prefix} to interface {name}"),
    )
}

/// Whether `name` is an interface name the kernel would take.
pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_is_the_subnets_last_address() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(ipv4_broadcast(ip("10.1.2.3"), 24), Some(ip("10.1.2.255")));
        assert_eq!(ipv4_broadcast(ip("10.1.2.3"), 0), Some(ip("255.255.255.255")));
        assert_eq!(ipv4_broadcast(ip("10.1.2.3"), 31), None);
        assert_eq!(ipv4_broadcast(ip("10.1.2.3"), 32), None);
    }

    #[test]
    fn v6_addresses_skip_dad_and_carry_local_and_address() {
        let prefix = IpPrefix { addr: "fd00::5".parse().unwrap(), prefix_len: 64 };
        let m = address_message(7, &prefix);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!(m.header.index, 7);
        assert_eq!(m.header.prefix_len, 64);
        assert!(m.header.flags.contains(AddressHeaderFlags::Nodad));
        assert!(m.attributes.contains(&AddressAttribute::Local(prefix.addr)));
        assert!(m.attributes.contains(&AddressAttribute::Address(prefix.addr)));
    }

    #[test]
    fn link_local_v6_is_recognised() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"169.254.1.1".parse().unwrap()));
    }

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("a23456789012345"));
        assert!(!valid_ifname("a234567890123456"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname(".."));
    }
}
