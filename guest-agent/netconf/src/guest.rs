//! The guest half, run by the agent (PID 1): bring up `lo`, and apply the pod network the host
//! found — interfaces (found by MAC), then permanent neighbours, then routes (those without a
//! gateway first, so that the gateways are reachable).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tern_protocol::net::{format_mac, InterfaceConfig, NetworkConfig, MAX_NET_ITEMS};

use crate::link::{self, valid_ifname, Link};
use crate::netlink::Rtnl;
use crate::route::{self, in_add_order};
use crate::NetError;

/// Largest MTU a guest NIC may be given.
const MAX_MTU: u32 = 65_535;

/// Bring the loopback interface up (the whole network of a pod without one).
pub fn loopback_up() -> Result<(), NetError> {
    let mut rtnl = Rtnl::open()?;
    lo_up(&mut rtnl)
}

fn lo_up(rtnl: &mut Rtnl) -> Result<(), NetError> {
    let lo = link::link_by_name(rtnl, "lo")?.ok_or_else(|| NetError::LinkNotFound { name: "lo".into() })?;
    if lo.is_up() {
        return Ok(());
    }
    link::set_up(rtnl, lo.index, "lo", true)
}

/// Apply `config` to the current network namespace: `lo` up; each interface found by its MAC,
/// taken down, given its MTU, renamed, given its addresses and brought up; then the permanent
/// neighbours; then the routes. Addresses and routes that already exist are fine, so applying
/// the same configuration twice succeeds.
pub fn configure(config: &NetworkConfig) -> Result<(), NetError> {
    validate(config)?;
    let mut rtnl = Rtnl::open()?;
    lo_up(&mut rtnl)?;
    let ipv6 = ipv6_available();
    if !ipv6 {
        tracing::warn!("the guest kernel has no IPv6: IPv6 addresses, routes and neighbours are skipped");
    }

    let links = link::list_links(&mut rtnl)?;
    let mut nics = Vec::with_capacity(config.interfaces.len());
    for interface in &config.interfaces {
        let nic = find_by_mac(&links, &interface.mac)
            .ok_or_else(|| NetError::NicNotFound { mac: format_mac(&interface.mac) })?;
        nics.push((interface, nic));
    }

    for (interface, nic) in &nics {
        if nic.is_up() {
            link::set_up(&mut rtnl, nic.index, &nic.name, false)?;
        }
        if nic.mtu != interface.mtu {
            link::set_mtu(&mut rtnl, nic.index, &nic.name, interface.mtu)?;
        }
    }
    rename_all(&mut rtnl, &nics)?;

    let mut index_of: HashMap<&str, u32> = HashMap::new();
    for (interface, nic) in &nics {
        for prefix in interface.addresses.iter().filter(|p| ipv6 || p.addr.is_ipv4()) {
            link::add_address(&mut rtnl, nic.index, &interface.name, prefix)?;
        }
        link::set_up(&mut rtnl, nic.index, &interface.name, true)?;
        index_of.insert(interface.name.as_str(), nic.index);
        tracing::debug!(interface = %interface.name, mac = %format_mac(&interface.mac), mtu = interface.mtu, "interface configured");
    }

    for neighbour in config.neighbors.iter().filter(|n| ipv6 || n.ip.is_ipv4()) {
        // validate() made sure every device is one of the interfaces.
        let Some(&index) = index_of.get(neighbour.device.as_str()) else {
            continue;
        };
        route::add_neighbour(&mut rtnl, index, neighbour)?;
    }
    for r in in_add_order(&config.routes) {
        let v4 = r.destination.map(|d| d.addr).or(r.gateway).or(r.source).is_none_or(|ip| ip.is_ipv4());
        if !ipv6 && !v4 {
            continue;
        }
        let Some(&index) = index_of.get(r.device.as_str()) else {
            continue;
        };
        route::add_route(&mut rtnl, index, r)?;
    }
    Ok(())
}

/// The non-loopback link with MAC `mac`.
fn find_by_mac<'a>(links: &'a [Link], mac: &[u8; 6]) -> Option<&'a Link> {
    links.iter().find(|l| !l.is_loopback() && l.mac.as_ref() == Some(mac))
}

/// Rename the NICs whose name differs, through temporary names so that two NICs can swap
/// names (the guest kernel's `eth1` may be the pod's `eth0`).
fn rename_all(rtnl: &mut Rtnl, nics: &[(&InterfaceConfig, &Link)]) -> Result<(), NetError> {
    let renamed: Vec<_> = nics.iter().filter(|(i, nic)| i.name != nic.name).collect();
    for (n, (_, nic)) in renamed.iter().enumerate() {
        link::rename(rtnl, nic.index, &nic.name, &temporary_name(n))?;
    }
    for (n, (interface, nic)) in renamed.iter().enumerate() {
        link::rename(rtnl, nic.index, &temporary_name(n), &interface.name)?;
    }
    Ok(())
}

fn temporary_name(n: usize) -> String {
    format!("tern-tmp{n}")
}

fn ipv6_available() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

/// Refuse what the kernel would refuse less clearly, and anything over the limits.
fn validate(config: &NetworkConfig) -> Result<(), NetError> {
    if !config.within_limits() {
        return Err(NetError::TooLarge { limit: MAX_NET_ITEMS });
    }
    let invalid = |what: String| Err(NetError::InvalidConfig(what));
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    for interface in &config.interfaces {
        if !valid_ifname(&interface.name) || interface.name.starts_with("tern-tmp") {
            return invalid(format!("{:?} is not a usable interface name", interface.name));
        }
        if !names.insert(interface.name.as_str()) {
            return invalid(format!("interface {} appears twice", interface.name));
        }
        if !macs.insert(interface.mac) {
            return invalid(format!("MAC {} appears twice", format_mac(&interface.mac)));
        }
        if interface.mtu == 0 || interface.mtu > MAX_MTU {
            return invalid(format!("interface {} has MTU {}", interface.name, interface.mtu));
        }
        for prefix in &interface.addresses {
            let max = if prefix.addr.is_ipv4() { 32 } else { 128 };
            if prefix.prefix_len > max {
                return invalid(format!("address {prefix} of interface {}", interface.name));
            }
        }
    }
    for r in &config.routes {
        if !names.contains(r.device.as_str()) {
            return invalid(format!("route {} uses unknown interface {}", route::describe(r), r.device));
        }
    }
    for n in &config.neighbors {
        if !names.contains(n.device.as_str()) {
            return invalid(format!("neighbour {} uses unknown interface {}", n.ip, n.device));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{LinkFlags, LinkLayerType};
    use tern_protocol::net::{IpPrefix, NeighborConfig, RouteConfig, RouteScope};

    fn link(index: u32, name: &str, mac: Option<[u8; 6]>, loopback: bool) -> Link {
        Link {
            index,
            name: name.into(),
            mac,
            mtu: 1500,
            flags: if loopback { LinkFlags::Loopback } else { LinkFlags::empty() },
            link_layer_type: if loopback { LinkLayerType::Loopback } else { LinkLayerType::Ether },
        }
    }

    fn interface(name: &str, mac: [u8; 6]) -> InterfaceConfig {
        InterfaceConfig {
            name: name.into(),
            mac,
            mtu: 1400,
            addresses: vec![IpPrefix { addr: "10.0.0.2".parse().unwrap(), prefix_len: 24 }],
        }
    }

    #[test]
    fn nics_are_found_by_mac_never_the_loopback() {
        let zero = [0u8; 6];
        let mac = [2, 0, 0, 0, 0, 9];
        let links = vec![
            link(1, "lo", Some(zero), true),
            link(2, "eth0", Some([2, 0, 0, 0, 0, 1]), false),
            link(3, "eth1", Some(mac), false),
        ];
        assert_eq!(find_by_mac(&links, &mac).map(|l| l.index), Some(3));
        assert_eq!(find_by_mac(&links, &zero), None);
        assert_eq!(find_by_mac(&links, &[2, 0, 0, 0, 0, 7]), None);
    }

    #[test]
    fn a_config_over_the_limits_is_refused() {
        let mut config = NetworkConfig::default();
        config.interfaces.push(interface("eth0", [2, 0, 0, 0, 0, 1]));
        config.interfaces[0].addresses = vec![config.interfaces[0].addresses[0]; MAX_NET_ITEMS + 1];
        assert!(matches!(validate(&config), Err(NetError::TooLarge { .. })));
        assert!(matches!(configure(&config), Err(NetError::TooLarge { .. })));
    }

    #[test]
    fn bad_names_duplicates_mtus_and_dangling_devices_are_refused() {
        let ok = NetworkConfig { interfaces: vec![interface("eth0", [2, 0, 0, 0, 0, 1])], ..Default::default() };
        assert!(validate(&ok).is_ok());

        let mut c = ok.clone();
        c.interfaces[0].name = "a/b".into();
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.interfaces[0].name = "tern-tmp0".into();
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.interfaces.push(interface("eth0", [2, 0, 0, 0, 0, 2]));
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.interfaces.push(interface("eth1", [2, 0, 0, 0, 0, 1]));
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.interfaces[0].mtu = 70_000;
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.interfaces[0].addresses[0].prefix_len = 33;
        assert!(validate(&c).is_err());
        let mut c = ok.clone();
        c.routes.push(RouteConfig {
            destination: None,
            gateway: Some("10.0.0.1".parse().unwrap()),
            source: None,
            device: "eth9".into(),
            scope: RouteScope::Universe,
            mtu: None,
        });
        assert!(validate(&c).is_err());
        let mut c = ok;
        c.neighbors.push(NeighborConfig {
            ip: "10.0.0.1".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 3],
            device: "eth9".into(),
        });
        assert!(validate(&c).is_err());
    }

    #[test]
    fn temporary_names_are_valid_interface_names() {
        assert!(valid_ifname(&temporary_name(MAX_NET_ITEMS)));
    }
}
