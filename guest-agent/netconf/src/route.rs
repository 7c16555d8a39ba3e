//! Routes and neighbours over rtnetlink: the host reads them from the pod's namespace, the
//! guest writes them.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope as NlRouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tern_protocol::net::{IpPrefix, NeighborConfig, RouteConfig, RouteScope};

use crate::netlink::Rtnl;
use crate::NetError;

/// One route, as a route dump describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub family: AddressFamily,
    pub destination: IpPrefix,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: NlRouteScope,
    pub protocol: RouteProtocol,
    pub table: u32,
    pub kind: RouteType,
    pub mtu: Option<u32>,
    pub multipath: bool,
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn unspecified(family: AddressFamily) -> Option<IpAddr> {
    match family {
        AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    }
}

impl Route {
    fn from_message(message: RouteMessage) -> Option<Route> {
        let header = &message.header;
        let mut route = Route {
            family: header.address_family,
            destination: IpPrefix {
                addr: unspecified(header.address_family)?,
                prefix_len: header.destination_prefix_length,
            },
            gateway: None,
            source: None,
            oif: None,
            scope: header.scope,
            protocol: header.protocol,
            table: u32::from(header.table),
            kind: header.kind,
            mtu: None,
            multipath: false,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(a) => route.destination.addr = route_ip(a)?,
                RouteAttribute::Gateway(a) => route.gateway = route_ip(a),
                RouteAttribute::PrefSource(a) => route.source = route_ip(a),
                RouteAttribute::Oif(index) => route.oif = Some(*index),
                RouteAttribute::Table(table) => route.table = *table,
                RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) => route.multipath = true,
                RouteAttribute::Metrics(metrics) => {
                    for metric in metrics {
                        if let RouteMetric::Mtu(mtu) = metric {
                            route.mtu = Some(*mtu).filter(|m| *m != 0);
                        }
                    }
                }
                _ => {}
            }
        }
        Some(route)
    }
}

/// Every IPv4 and IPv6 route of every table.
pub(crate) fn list_routes(rtnl: &mut Rtnl) -> Result<Vec<Route>, NetError> {
    let messages = rtnl.dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()), "list the routes")?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(route) => Route::from_message(route),
            _ => None,
        })
        .collect())
}

/// What the guest should get of one host route, if anything: a unicast route of the main table
/// through one of the `connected` interfaces (ifindex → name), not made by the kernel (the
/// guest's kernel makes its own prefix routes), not IPv6 link-local or multicast.
pub(crate) fn pod_route(route: &Route, connected: &HashMap<u32, String>) -> Option<RouteConfig> {
    let device = connected.get(&route.oif?)?;
    if route.table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || route.protocol == RouteProtocol::Kernel
        || route.kind != RouteType::Unicast
    {
        return None;
    }
    if let IpAddr::V6(v6) = route.destination.addr {
        let first = v6.segments()[0];
        if route.destination.prefix_len > 0 && (first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00) {
            return None;
        }
    }
    if route.multipath {
        tracing::info!(?route, "skipping a multipath route: the guest gets single-path routes only");
        return None;
    }
    let scope = match route.scope {
        NlRouteScope::Universe => RouteScope::Universe,
        NlRouteScope::Link => RouteScope::Link,
        NlRouteScope::Host => RouteScope::Host,
        other => {
            tracing::info!(?route, scope = ?other, "skipping a route of an unusual scope");
            return None;
        }
    };
    // The default route is `None`, unless only the destination tells its family (no gateway).
    let destination =
        if route.destination.prefix_len == 0 && route.gateway.is_some() { None } else { Some(route.destination) };
    Some(RouteConfig {
        destination,
        gateway: route.gateway,
        source: route.source,
        device: device.clone(),
        scope,
        mtu: route.mtu,
    })
}

/// Routes in the order the guest must add them: those without a gateway (link routes, which
/// make the gateways reachable) before those with one. Stable otherwise.
pub(crate) fn in_add_order(routes: &[RouteConfig]) -> Vec<&RouteConfig> {
    let (direct, via_gateway): (Vec<_>, Vec<_>) = routes.iter().partition(|r| r.gateway.is_none());
    direct.into_iter().chain(via_gateway).collect()
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The RTM_NEWROUTE message for `route` through link `oif`, in the main table.
pub(crate) fn route_message(oif: u32, route: &RouteConfig) -> Result<RouteMessage, NetError> {
    let invalid =
        |problem: &str| NetError::InvalidConfig(format!("route {} on {}: {problem}", describe(route), route.device));
    let family_ip = route
        .destination
        .map(|d| d.addr)
        .or(route.gateway)
        .or(route.source)
        .ok_or_else(|| invalid("neither a destination nor a gateway tells its address family"))?;
    for ip in [route.gateway, route.source].into_iter().flatten() {
        if !same_family(&ip, &family_ip) {
            return Err(invalid("mixes IPv4 and IPv6 addresses"));
        }
    }
    let max_prefix = if family_ip.is_ipv4() { 32 } else { 128 };
    let mut message = RouteMessage::default();
    let header = &mut message.header;
    header.address_family = if family_ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    header.table = RouteHeader::RT_TABLE_MAIN;
    // What `ip route add` uses: set by an administrator (here: the agent at boot).
    header.protocol = RouteProtocol::Boot;
    header.kind = RouteType::Unicast;
    header.scope = match route.scope {
        RouteScope::Universe => NlRouteScope::Universe,
        RouteScope::Link => NlRouteScope::Link,
        RouteScope::Host => NlRouteScope::Host,
    };
    if let Some(destination) = route.destination {
        if destination.prefix_len > max_prefix {
            return Err(invalid("prefix length too long"));
        }
        header.destination_prefix_length = destination.prefix_len;
        message.attributes.push(RouteAttribute::Destination(destination.addr.into()));
    }
    message.attributes.push(RouteAttribute::Oif(oif));
    if let Some(gateway) = route.gateway {
        message.attributes.push(RouteAttribute::Gateway(gateway.into()));
    }
    if let Some(source) = route.source {
        message.attributes.push(RouteAttribute::PrefSource(source.into()));
    }
    if let Some(mtu) = route.mtu {
        message.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    Ok(message)
}

/// `default via 10.0.0.1`, `10.1.0.0/16` — for messages.
pub(crate) fn describe(route: &RouteConfig) -> String {
    let destination = route.destination.map_or_else(|| "default".to_owned(), |d| d.to_string());
    match route.gateway {
        Some(gateway) => format!("{destination} via {gateway}"),
        None => destination,
    }
}

/// Add `route` through link `oif`; a route that is already there is fine.
pub(crate) fn add_route(rtnl: &mut Rtnl, oif: u32, route: &RouteConfig) -> Result<(), NetError> {
    let message = route_message(oif, route)?;
    rtnl.change_allowing(
        RouteNetlinkMessage::NewRoute(message),
        NLM_F_CREATE | NLM_F_EXCL,
        &[Errno::EEXIST],
        &format!("add route {} dev {}", describe(route), route.device),
    )
}

/// One neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Neighbour {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

/// Every IPv4 and IPv6 neighbour entry.
pub(crate) fn list_neighbours(rtnl: &mut Rtnl) -> Result<Vec<Neighbour>, NetError> {
    let messages = rtnl.dump(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), "list the neighbours")?;
    let mut neighbours = Vec::new();
    for message in messages {
        let RouteNetlinkMessage::NewNeighbour(message) = message else {
            continue;
        };
        let mut ip = None;
        let mut mac = None;
        for attribute in &message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => {}
            }
        }
        if let Some(ip) = ip {
            neighbours.push(Neighbour {
                index: message.header.ifindex,
                ip,
                mac,
                permanent: u16::from(message.header.state) & libc::NUD_PERMANENT != 0,
            });
        }
    }
    Ok(neighbours)
}

/// What the guest should get of one host neighbour entry: permanent ones with a MAC, on one
/// of the `connected` interfaces.
pub(crate) fn pod_neighbour(neighbour: &Neighbour, connected: &HashMap<u32, String>) -> Option<NeighborConfig> {
    if !neighbour.permanent {
        return None;
    }
    Some(NeighborConfig { ip: neighbour.ip, mac: neighbour.mac?, device: connected.get(&neighbour.index)?.clone() })
}

/// The RTM_NEWNEIGH message for a permanent entry on link `index`.
pub(crate) fn neighbour_message(index: u32, neighbour: &NeighborConfig) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = if neighbour.ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    message.header.ifindex = index;
    message.header.state = NeighbourState::Permanent;
    message.attributes.push(NeighbourAttribute::Destination(match neighbour.ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }));
    message.attributes.push(NeighbourAttribute::LinkLayerAddress(neighbour.mac.to_vec()));
    message
}

/// Add (or replace) a permanent neighbour entry on link `index`.
pub(crate) fn add_neighbour(rtnl: &mut Rtnl, index: u32, neighbour: &NeighborConfig) -> Result<(), NetError> {
    rtnl.change(
        RouteNetlinkMessage::NewNeighbour(neighbour_message(index, neighbour)),
        NLM_F_CREATE | NLM_F_REPLACE,
        &format!(
            "add neighbour {} lladdr {} dev {}",
            neighbour.ip,
            tern_protocol::net::format_mac(&neighbour.mac),
            neighbour.device
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dest: &str, prefix_len: u8, gateway: Option<&str>) -> Route {
        let addr: IpAddr = dest.parse().unwrap();
        Route {
            family: if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 },
            destination: IpPrefix { addr, prefix_len },
            gateway: gateway.map(|g| g.parse().unwrap()),
            source: None,
            oif: Some(2),
            scope: if gateway.is_some() { NlRouteScope::Universe } else { NlRouteScope::Link },
            protocol: RouteProtocol::Boot,
            table: 254,
            kind: RouteType::Unicast,
            mtu: None,
            multipath: false,
        }
    }

    fn connected() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_owned())])
    }

    fn config(dest: Option<&str>, gateway: Option<&str>) -> RouteConfig {
        RouteConfig {
            destination: dest.map(|d| {
                let (addr, len) = d.split_once('/').unwrap();
                IpPrefix { addr: addr.parse().unwrap(), prefix_len: len.parse().unwrap() }
            }),
            gateway: gateway.map(|g| g.parse().unwrap()),
            source: None,
            device: "eth0".into(),
            scope: if gateway.is_some() { RouteScope::Universe } else { RouteScope::Link },
            mtu: None,
        }
    }

    #[test]
    fn the_default_route_via_a_gateway_is_kept_as_none() {
        let r = pod_route(&route("0.0.0.0", 0, Some("10.0.0.1")), &connected()).unwrap();
        assert_eq!(r.destination, None);
        assert_eq!(r.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(r.device, "eth0");
        assert_eq!(r.scope, RouteScope::Universe);
    }

    #[test]
    fn a_default_route_without_gateway_keeps_its_family_in_the_destination() {
        let r = pod_route(&route("::", 0, None), &connected()).unwrap();
        assert_eq!(r.destination, Some(IpPrefix { addr: "::".parse().unwrap(), prefix_len: 0 }));
        assert!(route_message(2, &r).is_ok());
    }

    #[test]
    fn kernel_other_table_foreign_device_and_v6_special_routes_are_skipped() {
        let mut kernel = route("10.0.0.0", 24, None);
        kernel.protocol = RouteProtocol::Kernel;
        assert_eq!(pod_route(&kernel, &connected()), None);
        let mut local = route("10.0.0.0", 24, None);
        local.table = 255;
        assert_eq!(pod_route(&local, &connected()), None);
        let mut elsewhere = route("10.0.0.0", 24, None);
        elsewhere.oif = Some(3);
        assert_eq!(pod_route(&elsewhere, &connected()), None);
        assert_eq!(pod_route(&route("fe80::", 64, None), &connected()), None);
        assert_eq!(pod_route(&route("ff00::", 8, None), &connected()), None);
        let mut multipath = route("10.9.0.0", 16, Some("10.0.0.1"));
        multipath.multipath = true;
        assert_eq!(pod_route(&multipath, &connected()), None);
        assert!(pod_route(&route("fd00:1::", 64, Some("fd00::1")), &connected()).is_some());
    }

    #[test]
    fn route_mtu_is_carried_over() {
        let mut r = route("10.9.0.0", 16, Some("10.0.0.1"));
        r.mtu = Some(1300);
        let c = pod_route(&r, &connected()).unwrap();
        assert_eq!(c.mtu, Some(1300));
        let m = route_message(2, &c).unwrap();
        assert!(m.attributes.contains(&RouteAttribute::Metrics(vec![RouteMetric::Mtu(1300)])));
    }

    #[test]
    fn link_routes_are_added_before_gateway_routes() {
        let routes = vec![
            config(None, Some("10.0.0.1")),
            config(Some("10.0.0.1/32"), None),
            config(Some("10.9.0.0/16"), Some("10.0.0.1")),
            config(Some("fd00::/64"), None),
        ];
        let order: Vec<String> = in_add_order(&routes).into_iter().map(describe).collect();
        assert_eq!(order, ["10.0.0.1/32", "fd00::/64", "default via 10.0.0.1", "10.9.0.0/16 via 10.0.0.1"]);
    }

    #[test]
    fn route_messages_go_to_the_main_table_with_the_device() {
        let m = route_message(4, &config(None, Some("fd00::1"))).unwrap();
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(m.header.destination_prefix_length, 0);
        assert_eq!(m.header.scope, NlRouteScope::Universe);
        assert!(m.attributes.contains(&RouteAttribute::Oif(4)));
        assert!(m.attributes.contains(&RouteAttribute::Gateway("fd00::1".parse::<IpAddr>().unwrap().into())));
        assert!(!m.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(_))));
    }

    #[test]
    fn invalid_routes_are_refused_before_the_kernel_sees_them() {
        assert!(route_message(1, &config(None, None)).is_err());
        assert!(route_message(1, &config(Some("10.0.0.0/24"), Some("fd00::1"))).is_err());
        assert!(route_message(1, &config(Some("10.0.0.0/33"), None)).is_err());
    }

    #[test]
    fn only_permanent_neighbours_with_a_mac_on_connected_devices_are_kept() {
        let n = |permanent, mac: Option<[u8; 6]>, index| Neighbour {
            index,
            ip: "10.0.0.1".parse().unwrap(),
            mac,
            permanent,
        };
        let mac = Some([2, 0, 0, 0, 0, 1]);
        assert_eq!(pod_neighbour(&n(true, mac, 2), &connected()).unwrap().device, "eth0");
        assert_eq!(pod_neighbour(&n(false, mac, 2), &connected()), None);
        assert_eq!(pod_neighbour(&n(true, None, 2), &connected()), None);
        assert_eq!(pod_neighbour(&n(true, mac, 9), &connected()), None);
        let m = neighbour_message(2, &pod_neighbour(&n(true, mac, 2), &connected()).unwrap());
        assert_eq!(m.header.state, NeighbourState::Permanent);
    }
}
