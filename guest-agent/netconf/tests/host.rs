//! The host half against real network namespaces (root only; see `support::can_run`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::path::Path;

use support::{can_run, try_sh, TestNetns};
use tern_netconf::host::{check_netns, connect_pod_network, disconnect_pod_network};
use tern_netconf::NetError;
use tern_protocol::net::{IpPrefix, NeighborConfig, RouteScope};

const POD_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// A pod namespace as CNI leaves it: `eth0` (a veth) with 10.77.0.2/24 and fd77::2/64, MTU
/// 1400, a default route via 10.77.0.1, a route with an MTU, a permanent neighbour; and a
/// second veth pair without addresses, which must be skipped.
fn pod_netns() -> TestNetns {
    let mut ns = TestNetns::new();
    ns.add_veth("eth0");
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "set", "eth0", "mtu", "1400", "address", "02:00:00:00:00:aa", "up"]);
    ns.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
    ns.ip(&["route", "add", "default", "via", "10.77.0.1"]);
    ns.ip(&["route", "add", "10.99.0.0/16", "via", "10.77.0.1", "mtu", "1300"]);
    ns.ip(&["neigh", "add", "10.77.0.1", "lladdr", "02:00:00:00:00:01", "dev", "eth0", "nud", "permanent"]);
    ns.ip(&["link", "add", "idle0", "type", "veth", "peer", "name", "idle1"]);
    ns.ip(&["link", "set", "idle0", "up"]);
    ns
}

fn prefix(s: &str) -> IpPrefix {
    let (addr, len) = s.split_once('/').unwrap();
    IpPrefix { addr: addr.parse().unwrap(), prefix_len: len.parse().unwrap() }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// No ingress qdisc, filter or tern tap is left in `ns`.
fn assert_nothing_left(ns: &TestNetns) {
    let qdiscs = ns.tc(&["qdisc", "show"]);
    assert!(!qdiscs.contains("ingress"), "qdiscs left:\n{qdiscs}");
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "parent", "ffff:"]);
    assert!(filters.trim().is_empty(), "filters left:\n{filters}");
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains("_tern"), "taps left:\n{links}");
}

#[test]
fn connect_then_disconnect_a_pod_network() {
    if !can_run("connect_then_disconnect_a_pod_network") {
        return;
    }
    let ns = pod_netns();
    let network = connect_pod_network(&ns.path()).unwrap();

    // What the VMM gets.
    assert_eq!(network.nics.len(), 1, "{network:?}");
    let nic = &network.nics[0];
    assert_eq!((nic.interface.as_str(), nic.tap_name.as_str()), ("eth0", "tap0_tern"));
    assert_eq!((nic.mac, nic.mtu), (POD_MAC, 1400));

    // What the guest gets.
    let config = &network.config;
    assert_eq!(config.interfaces.len(), 1);
    let interface = &config.interfaces[0];
    assert_eq!((interface.name.as_str(), interface.mac, interface.mtu), ("eth0", POD_MAC, 1400));
    let mut addresses: Vec<String> = interface.addresses.iter().map(IpPrefix::to_string).collect();
    addresses.sort();
    assert_eq!(addresses, ["10.77.0.2/24", "fd77::2/64"]);
    let default = config.routes.iter().find(|r| r.destination.is_none()).expect("no default route");
    assert_eq!(
        (default.gateway, default.device.as_str(), default.scope),
        (Some(ip("10.77.0.1")), "eth0", RouteScope::Universe)
    );
    let with_mtu = config.routes.iter().find(|r| r.destination == Some(prefix("10.99.0.0/16"))).expect("no 10.99/16");
    assert_eq!((with_mtu.gateway, with_mtu.mtu), (Some(ip("10.77.0.1")), Some(1300)));
    // Kernel routes (the subnets of the addresses, fe80::/64) stay behind: the guest's kernel
    // makes its own.
    assert_eq!(config.routes.len(), 2, "{:?}", config.routes);
    assert_eq!(config.neighbors, vec![NeighborConfig { ip: ip("10.77.0.1"), mac: GATEWAY_MAC, device: "eth0".into() }]);

    // What the namespace looks like.
    let tap = ns.ip(&["-d", "link", "show", "tap0_tern"]);
    assert!(tap.contains("mtu 1400"), "{tap}");
    assert!(tap.contains("tun type tap"), "{tap}");
    assert!(tap.contains(",UP") || tap.contains("<UP"), "{tap}");
    // The tap sends nothing of its own to the guest (no IPv6 link-local, no RS/DAD).
    assert!(tap.contains("addrgenmode none"), "{tap}");
    let tap_addresses = ns.ip(&["addr", "show", "dev", "tap0_tern"]);
    assert!(!tap_addresses.contains("inet"), "{tap_addresses}");
    for (dev, target) in [("eth0", "tap0_tern"), ("tap0_tern", "eth0")] {
        let qdisc = ns.tc(&["qdisc", "show", "dev", dev]);
        assert!(qdisc.contains("qdisc ingress ffff:"), "{dev}: {qdisc}");
        let filter = ns.tc(&["filter", "show", "dev", dev, "parent", "ffff:"]);
        assert!(filter.contains("protocol all"), "{dev}: {filter}");
        assert!(filter.contains("u32"), "{dev}: {filter}");
        assert!(filter.contains(&format!("Egress Redirect to device {target}")), "{dev}: {filter}");
        assert!(filter.contains("stolen"), "{dev}: {filter}");
    }
    // The interface without addresses was left alone.
    assert!(!ns.tc(&["qdisc", "show", "dev", "idle0"]).contains("ingress"));

    // The taps go with their descriptors (the VM's, here ours)...
    drop(network);
    let (tap_exists, _) = try_sh("ip", &["-n", &ns.name, "link", "show", "tap0_tern"]);
    assert!(!tap_exists, "the tap outlived its descriptor");
    // ...which leaves the veth redirecting to nothing, until the disconnect.
    assert!(ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    disconnect_pod_network(&ns.path()).unwrap();
    assert_nothing_left(&ns);
    // Idempotent.
    disconnect_pod_network(&ns.path()).unwrap();
    assert_nothing_left(&ns);
    // The pod's own configuration is untouched.
    assert!(ns.ip(&["addr", "show", "dev", "eth0"]).contains("10.77.0.2/24"));
    assert!(ns.ip(&["route", "show"]).contains("default via 10.77.0.1 dev eth0"));
}

#[test]
fn disconnect_also_removes_taps_still_open() {
    if !can_run("disconnect_also_removes_taps_still_open") {
        return;
    }
    let ns = pod_netns();
    let network = connect_pod_network(&ns.path()).unwrap();
    disconnect_pod_network(&ns.path()).unwrap();
    assert_nothing_left(&ns);
    drop(network);
    disconnect_pod_network(&ns.path()).unwrap();
}

#[test]
fn a_failed_connect_leaves_nothing_behind() {
    if !can_run("a_failed_connect_leaves_nothing_behind") {
        return;
    }
    let ns = pod_netns();
    // Someone else's ingress qdisc on eth0 makes the connect fail after the tap was made.
    ns.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    let err = connect_pod_network(&ns.path()).unwrap_err();
    assert!(err.to_string().contains("eth0"), "{err}");
    assert_eq!(err.errno(), Some(nix::errno::Errno::EEXIST), "{err}");
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains("_tern"), "a tap leaked:\n{links}");
    // The qdisc tern did not make is still there.
    assert!(ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}

#[test]
fn a_namespace_without_addressed_interfaces_connects_nothing() {
    if !can_run("a_namespace_without_addressed_interfaces_connects_nothing") {
        return;
    }
    let ns = TestNetns::new();
    let network = connect_pod_network(&ns.path()).unwrap();
    assert!(network.nics.is_empty());
    assert_eq!(network.config, Default::default());
}

#[test]
fn bad_namespace_paths_are_refused_clearly() {
    let missing = Path::new("/var/run/netns/tern-no-such-netns");
    let err = connect_pod_network(missing).unwrap_err();
    assert!(matches!(err, NetError::NetnsMissing { .. }), "{err}");
    assert!(err.to_string().contains("tern-no-such-netns"), "{err}");
    // Nothing to clean in a namespace that is gone.
    disconnect_pod_network(missing).unwrap();

    let file = tempfile::NamedTempFile::new().unwrap();
    let err = connect_pod_network(file.path()).unwrap_err();
    assert!(matches!(err, NetError::NotANetns { .. }), "{err}");
    assert!(err.to_string().contains(&file.path().display().to_string()), "{err}");

    // Another kind of namespace is not a network namespace either.
    let err = check_netns(Path::new("/proc/self/ns/uts")).unwrap_err();
    assert!(matches!(err, NetError::NotANetns { .. }), "{err}");

    if !can_run("bad_namespace_paths_are_refused_clearly (host netns)") {
        return;
    }
    let mut hosts = vec!["/proc/self/ns/net"];
    if std::fs::metadata("/proc/1/ns/net").is_ok() {
        hosts.push("/proc/1/ns/net");
    } else {
        // A sandbox that denies ptrace access to PID 1 (as some CI containers do).
        eprintln!("/proc/1/ns/net is not readable here; checking the host netns through /proc/self only");
        let err = connect_pod_network(Path::new("/proc/1/ns/net")).unwrap_err();
        assert!(matches!(err, NetError::OpenNetns { .. }), "{err}");
    }
    for host in hosts {
        let err = connect_pod_network(Path::new(host)).unwrap_err();
        assert!(matches!(err, NetError::HostNetns { .. }), "{host}: {err}");
        assert!(err.to_string().contains("cannot share the host network namespace"), "{err}");
        // Never clean up the host's namespace either.
        assert!(matches!(disconnect_pod_network(Path::new(host)), Err(NetError::HostNetns { .. })));
    }
}
