//! The pod network as the host found it in the sandbox's network namespace, for
//! [`Request::ConfigureNetwork`](crate::Request::ConfigureNetwork).
//!
//! The host (Kata's "tcfilter" model) connects one tap per pod interface and gives the guest NIC
//! the interface's MAC; the agent finds each NIC by that MAC and applies the rest over netlink,
//! in the order interfaces → neighbours → routes (link-scope routes before gateway routes).

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Most interfaces, addresses, routes or neighbours one configuration may carry (guest input
/// caps: the agent refuses a larger request instead of looping over it).
pub const MAX_NET_ITEMS: usize = 256;

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One guest NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceConfig {
    /// Name to give the guest NIC (the pod interface's name, e.g. `eth0`).
    pub name: String,
    /// The MAC the guest NIC already carries (the pod veth's): how the agent finds it.
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpPrefix>,
}

/// Route scope, as netlink numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteScope {
    Universe,
    Link,
    Host,
}

/// One route of the pod's main table (kernel-made routes excluded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// `None`: the default route.
    pub destination: Option<IpPrefix>,
    pub gateway: Option<IpAddr>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// The interface (a name of [`InterfaceConfig::name`]).
    pub device: String,
    pub scope: RouteScope,
    /// Route MTU (`RTAX_MTU`), when the host route had one.
    pub mtu: Option<u32>,
}

/// One permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighborConfig {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub device: String,
}

/// Everything the agent applies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    pub routes: Vec<RouteConfig>,
    pub neighbors: Vec<NeighborConfig>,
}

impl NetworkConfig {
    /// Whether every list is within [`MAX_NET_ITEMS`] (and each interface's addresses too).
    pub fn within_limits(&self) -> bool {
        self.interfaces.len() <= MAX_NET_ITEMS
            && self.routes.len() <= MAX_NET_ITEMS
            && self.neighbors.len() <= MAX_NET_ITEMS
            && self.interfaces.iter().all(|i| i.addresses.len() <= MAX_NET_ITEMS)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_formats_lowercase_with_colons() {
        assert_eq!(format_mac(&[0x0a, 0x58, 0, 1, 0xfe, 0xff]), "0a:58:00:01:fe:ff");
    }

    #[test]
    fn limits_count_addresses_too() {
        let mut c = NetworkConfig::default();
        assert!(c.within_limits());
        c.interfaces.push(InterfaceConfig {
            name: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: vec![IpPrefix { addr: "10.0.0.2".parse().unwrap(), prefix_len: 24 }; MAX_NET_ITEMS + 1],
        });
        assert!(!c.within_limits());
    }
}
