//! The host half: connecting a VM to the interfaces CNI prepared in a pod's network namespace,
//! and disconnecting it again.
//!
//! For every non-loopback interface with an address, a tap is created inside the namespace,
//! and both get an ingress qdisc with a match-all u32 filter that redirects every frame to the
//! other's egress (Kata's "tcfilter" model). The interface keeps its addresses; the guest NIC
//! gets its MAC and MTU, and the agent applies the addresses, routes and permanent neighbours
//! read here.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::Path;

use tern_protocol::net::{InterfaceConfig, IpPrefix, NetworkConfig, MAX_NET_ITEMS};

use crate::link::{self, Link};
use crate::netlink::Rtnl;
use crate::netns::{in_netns, open_netns};
use crate::route::{self, pod_neighbour, pod_route};
use crate::tap::{create_tap, TUN_PATH};
use crate::{tc, NetError};

/// Largest MTU a virtio-net device can announce (its config field is 16 bits).
pub const MAX_MTU: u32 = 65_535;

/// One pod interface connected to a tap.
#[derive(Debug)]
pub struct PodNic {
    /// The tap's descriptor: non-blocking, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, vnet header
    /// size already set to 12 bytes. The tap disappears when its last descriptor closes.
    pub tap: OwnedFd,
    /// The tap's name inside the namespace (`tap<N>_tern`).
    pub tap_name: String,
    /// The pod interface (the veth CNI made), e.g. `eth0`.
    pub interface: String,
    /// The pod interface's MAC, which the guest NIC must carry.
    pub mac: [u8; 6],
    /// The pod interface's MTU (at most [`MAX_MTU`]).
    pub mtu: u32,
}

/// A connected pod network.
#[derive(Debug)]
pub struct PodNetwork {
    /// One per connected interface; `config.interfaces[i]` describes `nics[i]`.
    pub nics: Vec<PodNic>,
    /// What the agent applies in the guest.
    pub config: NetworkConfig,
}

/// Whether `name` is one of the taps tern makes (`tap<N>_tern`).
pub fn is_tern_tap(name: &str) -> bool {
    name.strip_prefix("tap")
        .and_then(|rest| rest.strip_suffix("_tern"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name of the tap for the `n`th connected interface.
fn tap_name(n: usize) -> String {
    format!("tap{n}_tern")
}

/// Check that `netns` is a network namespace tern may use: it exists, is a network namespace,
/// and is not the host's.
pub fn check_netns(netns: &Path) -> Result<(), NetError> {
    open_netns(netns).map(drop)
}

/// Connect a tap to every addressed interface of the network namespace at `netns` (blocking:
/// the work runs on a thread of its own inside the namespace). On failure nothing is left
/// behind.
pub fn connect_pod_network(netns: &Path) -> Result<PodNetwork, NetError> {
    let file = open_netns(netns)?;
    if !Path::new(TUN_PATH).exists() {
        return Err(NetError::TunMissing);
    }
    in_netns(netns, file, connect_inside)
}

/// Remove what [`connect_pod_network`] added to the namespace at `netns`: the ingress qdiscs
/// (with their filters) redirecting to a tern tap, or to a device that no longer exists, and
/// any tern tap left. Idempotent; a namespace that no longer exists has nothing to clean.
pub fn disconnect_pod_network(netns: &Path) -> Result<(), NetError> {
    let file = match open_netns(netns) {
        Ok(file) => file,
        Err(NetError::NetnsMissing { .. }) => return Ok(()),
        // What is left at the path after the namespace was unmounted from it.
        Err(NetError::NotANetns { .. }) => {
            tracing::info!(netns = %netns.display(), "no longer a network namespace; nothing to disconnect");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    in_netns(netns, file, disconnect_inside)
}

/// One interface to connect.
struct PodInterface {
    link: Link,
    mac: [u8; 6],
}

fn connect_inside() -> Result<PodNetwork, NetError> {
    let mut rtnl = Rtnl::open()?;
    let (interfaces, config) = scan(&mut rtnl)?;
    let mut undo = Undo::default();
    match wire(&mut rtnl, &interfaces, &mut undo) {
        Ok(()) => {
            let nics = undo
                .taps
                .drain(..)
                .zip(&interfaces)
                .map(|((tap_name, tap), interface)| PodNic {
                    tap,
                    tap_name,
                    interface: interface.link.name.clone(),
                    mac: interface.mac,
                    mtu: interface.link.mtu,
                })
                .collect();
            Ok(PodNetwork { nics, config })
        }
        Err(e) => {
            undo.run(&mut rtnl);
            Err(e)
        }
    }
}

/// Read the namespace: which interfaces to connect, and the guest's configuration.
fn scan(rtnl: &mut Rtnl) -> Result<(Vec<PodInterface>, NetworkConfig), NetError> {
    let mut links = link::list_links(rtnl)?;
    links.sort_by_key(|l| l.index);
    let addresses = link::list_addresses(rtnl)?;

    let mut interfaces = Vec::new();
    let mut config = NetworkConfig::default();
    for link in links {
        if link.is_loopback() || is_tern_tap(&link.name) {
            continue;
        }
        let prefixes: Vec<IpPrefix> = addresses
            .iter()
            .filter(|a| a.index == link.index && !link::is_ipv6_link_local(&a.prefix.addr))
            .map(|a| a.prefix)
            .collect();
        let Some(interface) = interface_config(&link, prefixes)? else {
            tracing::info!(interface = %link.name, "skipping an interface without addresses");
            continue;
        };
        if interfaces.len() >= MAX_NET_ITEMS {
            return Err(NetError::TooLarge { limit: MAX_NET_ITEMS });
        }
        interfaces.push(PodInterface { mac: interface.mac, link });
        config.interfaces.push(interface);
    }

    let connected: HashMap<u32, String> = interfaces.iter().map(|i| (i.link.index, i.link.name.clone())).collect();
    if !connected.is_empty() {
        config.routes = route::list_routes(rtnl)?.iter().filter_map(|r| pod_route(r, &connected)).collect();
        config.neighbors = route::list_neighbours(rtnl)?.iter().filter_map(|n| pod_neighbour(n, &connected)).collect();
    }
    if !config.within_limits() {
        return Err(NetError::TooLarge { limit: MAX_NET_ITEMS });
    }
    Ok((interfaces, config))
}

/// What the guest NIC standing in for `link` gets; `None` for an interface without addresses
/// (nothing to reach it by).
fn interface_config(link: &Link, addresses: Vec<IpPrefix>) -> Result<Option<InterfaceConfig>, NetError> {
    if addresses.is_empty() {
        return Ok(None);
    }
    if link.mtu > MAX_MTU {
        return Err(NetError::MtuTooLarge { interface: link.name.clone(), mtu: link.mtu });
    }
    let mac = link.mac.ok_or_else(|| NetError::NoMac { interface: link.name.clone() })?;
    Ok(Some(InterfaceConfig { name: link.name.clone(), mac, mtu: link.mtu, addresses }))
}

/// What [`wire`] did so far, to undo on failure.
#[derive(Default)]
struct Undo {
    /// Links given an ingress qdisc: (index, name).
    qdiscs: Vec<(u32, String)>,
    /// Taps created, in interface order: (name, descriptor).
    taps: Vec<(String, OwnedFd)>,
}

impl Undo {
    fn run(self, rtnl: &mut Rtnl) {
        for (index, name) in self.qdiscs.iter().rev() {
            if let Err(e) = tc::delete_ingress_qdisc(rtnl, *index, name) {
                tracing::warn!(interface = %name, error = %e, "cannot undo the ingress qdisc");
            }
        }
        // Closing a non-persistent tap's only descriptor deletes the tap.
        drop(self.taps);
    }
}

/// Create the taps and the redirects, recording each step in `undo`.
fn wire(rtnl: &mut Rtnl, interfaces: &[PodInterface], undo: &mut Undo) -> Result<(), NetError> {
    for (n, interface) in interfaces.iter().enumerate() {
        let pod = &interface.link;
        let name = tap_name(n);
        let fd = create_tap(&name)?;
        undo.taps.push((name.clone(), fd));
        let tap = link::link_by_name(rtnl, &name)?.ok_or_else(|| NetError::LinkNotFound { name: name.clone() })?;
        link::set_mtu(rtnl, tap.index, &name, pod.mtu)?;
        // Best effort: a host without IPv6 has nothing to turn off.
        if let Err(e) = link::disable_ipv6_autoconf(rtnl, tap.index, &name) {
            tracing::debug!(tap = %name, error = %e, "tap keeps IPv6 address generation");
        }
        link::set_up(rtnl, tap.index, &name, true)?;

        tc::add_ingress_qdisc(rtnl, pod.index, &pod.name)?;
        undo.qdiscs.push((pod.index, pod.name.clone()));
        tc::add_ingress_qdisc(rtnl, tap.index, &name)?;
        undo.qdiscs.push((tap.index, name.clone()));
        tc::add_redirect_filter(rtnl, (pod.index, &pod.name), (tap.index, &name))?;
        tc::add_redirect_filter(rtnl, (tap.index, &name), (pod.index, &pod.name))?;
        tracing::debug!(interface = %pod.name, tap = %name, mtu = pod.mtu, "pod interface redirected to its tap");
    }
    Ok(())
}

fn disconnect_inside() -> Result<(), NetError> {
    let mut rtnl = Rtnl::open()?;
    let links = link::list_links(&mut rtnl)?;
    let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let taps: HashSet<u32> = links.iter().filter(|l| is_tern_tap(&l.name)).map(|l| l.index).collect();

    // Keep going past a failure so one stuck device does not keep the rest connected.
    let mut first_error = None;
    for index in tc::links_with_ingress_qdisc(&mut rtnl)? {
        let Some(link) = by_index.get(&index) else {
            continue;
        };
        // A tap's qdisc goes with the tap, below.
        if link.is_loopback() || taps.contains(&index) {
            continue;
        }
        let ours = match tc::ingress_redirect_targets(&mut rtnl, index, &link.name) {
            // A tap that is gone (its descriptor closed with the VM or the shim) leaves a
            // redirect to an ifindex that no longer exists.
            Ok(targets) => targets.iter().any(|t| taps.contains(t) || !by_index.contains_key(t)),
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if ours {
            match tc::delete_ingress_qdisc(&mut rtnl, index, &link.name) {
                Ok(()) => tracing::info!(interface = %link.name, "removed tern's ingress redirect"),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    for link in links.iter().filter(|l| taps.contains(&l.index)) {
        match link::delete_link(&mut rtnl, link.index, &link.name) {
            Ok(()) => tracing::info!(tap = %link.name, "removed a leftover tap"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tern_taps_are_recognised_by_name() {
        assert!(is_tern_tap("tap0_tern"));
        assert!(is_tern_tap(&tap_name(255)));
        assert!(!is_tern_tap("tap_tern"));
        assert!(!is_tern_tap("tapx_tern"));
        assert!(!is_tern_tap("tap0"));
        assert!(!is_tern_tap("eth0"));
        assert!(tap_name(255).len() < libc::IFNAMSIZ);
    }

    fn veth(mtu: u32, mac: Option<[u8; 6]>) -> Link {
        Link {
            index: 2,
            name: "eth0".into(),
            mac,
            mtu,
            flags: netlink_packet_route::link::LinkFlags::Up,
            link_layer_type: netlink_packet_route::link::LinkLayerType::Ether,
        }
    }

    #[test]
    fn an_interface_takes_the_veths_name_mac_and_mtu() {
        let mac = [0x0a, 0x58, 0, 0, 0, 5];
        let addresses = vec![IpPrefix { addr: "10.88.0.5".parse().unwrap(), prefix_len: 16 }];
        let config = interface_config(&veth(1450, Some(mac)), addresses.clone()).unwrap().unwrap();
        assert_eq!(config, InterfaceConfig { name: "eth0".into(), mac, mtu: 1450, addresses });
    }

    #[test]
    fn interfaces_without_addresses_are_skipped() {
        assert!(interface_config(&veth(1500, Some([2, 0, 0, 0, 0, 1])), vec![]).unwrap().is_none());
    }

    #[test]
    fn an_mtu_over_65535_is_refused_naming_the_interface() {
        let addresses = vec![IpPrefix { addr: "10.0.0.2".parse().unwrap(), prefix_len: 24 }];
        let err = interface_config(&veth(65_536, Some([2, 0, 0, 0, 0, 1])), addresses.clone()).unwrap_err();
        assert!(err.to_string().contains("eth0"), "{err}");
        assert!(matches!(err, NetError::MtuTooLarge { mtu: 65_536, .. }));
        let err = interface_config(&veth(1500, None), addresses).unwrap_err();
        assert!(matches!(err, NetError::NoMac { .. }), "{err}");
    }

    #[test]
    fn missing_and_non_namespace_paths_are_told_apart() {
        let missing = Path::new("/nonexistent/tern-netns");
        assert!(matches!(connect_pod_network(missing), Err(NetError::NetnsMissing { .. })));
        assert!(disconnect_pod_network(missing).is_ok());
        let dir = std::env::temp_dir();
        assert!(matches!(check_netns(&dir), Err(NetError::NotANetns { .. })));
    }
}
