//! The guest half against a fresh network namespace standing in for the guest, with veth ends
//! of known MACs standing in for its virtio NICs (root only; see `support::can_run`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{can_run, TestNetns};
use tern_netconf::guest::{configure, loopback_up};
use tern_netconf::NetError;
use tern_protocol::net::{InterfaceConfig, IpPrefix, NeighborConfig, NetworkConfig, RouteConfig, RouteScope};

const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xa1];
const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xb2];

fn prefix(s: &str) -> IpPrefix {
    let (addr, len) = s.split_once('/').unwrap();
    IpPrefix { addr: addr.parse().unwrap(), prefix_len: len.parse().unwrap() }
}

fn route(destination: Option<&str>, gateway: Option<&str>, device: &str, mtu: Option<u32>) -> RouteConfig {
    RouteConfig {
        destination: destination.map(prefix),
        gateway: gateway.map(|g| g.parse().unwrap()),
        source: None,
        device: device.into(),
        scope: if gateway.is_some() { RouteScope::Universe } else { RouteScope::Link },
        mtu,
    }
}

/// The pod's `eth0` goes to the NIC with MAC A, which the "guest kernel" named `nic7`, while
/// the NIC with MAC B is already called `eth0` and must become `eth1`: a swap.
fn config() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![
            InterfaceConfig {
                name: "eth0".into(),
                mac: MAC_A,
                mtu: 1400,
                addresses: vec![prefix("10.78.0.2/24"), prefix("fd78::2/64")],
            },
            InterfaceConfig { name: "eth1".into(), mac: MAC_B, mtu: 1500, addresses: vec![prefix("10.79.0.2/24")] },
        ],
        // Gateway routes first on purpose: the agent must reorder them.
        routes: vec![
            route(None, Some("10.78.5.1"), "eth0", None),
            route(Some("10.98.0.0/16"), Some("10.78.0.1"), "eth0", Some(1300)),
            route(None, Some("fd78::1"), "eth0", None),
            route(Some("10.78.5.1/32"), None, "eth0", None),
        ],
        neighbors: vec![NeighborConfig {
            ip: "10.78.0.1".parse().unwrap(),
            mac: [2, 0, 0, 0, 0, 1],
            device: "eth0".into(),
        }],
    }
}

/// A namespace with two veth pairs: `nic7` (MAC A) and `eth0` (MAC B), their peers up.
fn guest_netns() -> TestNetns {
    let ns = TestNetns::new();
    ns.ip(&["link", "add", "nic7", "address", "02:00:00:00:00:a1", "type", "veth", "peer", "name", "peer7"]);
    ns.ip(&["link", "add", "eth0", "address", "02:00:00:00:00:b2", "type", "veth", "peer", "name", "peer0"]);
    ns.ip(&["link", "set", "peer7", "up"]);
    ns.ip(&["link", "set", "peer0", "up"]);
    ns
}

fn assert_configured(ns: &TestNetns) {
    let lo = ns.ip(&["link", "show", "lo"]);
    assert!(lo.contains(",UP"), "lo is down: {lo}");

    let eth0 = ns.ip(&["link", "show", "eth0"]);
    assert!(eth0.contains("02:00:00:00:00:a1"), "eth0 is not the NIC with MAC A: {eth0}");
    assert!(eth0.contains("mtu 1400"), "{eth0}");
    assert!(eth0.contains(",UP"), "{eth0}");
    let eth1 = ns.ip(&["link", "show", "eth1"]);
    assert!(eth1.contains("02:00:00:00:00:b2") && eth1.contains(",UP"), "{eth1}");

    let addresses = ns.ip(&["addr", "show", "dev", "eth0"]);
    assert!(addresses.contains("inet 10.78.0.2/24"), "{addresses}");
    assert!(addresses.contains("inet6 fd78::2/64"), "{addresses}");
    let v6 = addresses.lines().find(|l| l.contains("fd78::2/64")).unwrap_or_default();
    assert!(!v6.contains("tentative"), "DAD was not skipped: {addresses}");
    assert!(ns.ip(&["addr", "show", "dev", "eth1"]).contains("inet 10.79.0.2/24"));

    let routes = ns.ip(&["route", "show"]);
    assert!(routes.contains("default via 10.78.5.1 dev eth0"), "{routes}");
    assert!(routes.contains("10.78.5.1 dev eth0"), "{routes}");
    let with_mtu = routes.lines().find(|l| l.starts_with("10.98.0.0/16")).unwrap_or_default();
    assert!(with_mtu.contains("via 10.78.0.1 dev eth0") && with_mtu.contains("mtu 1300"), "{routes}");
    let routes6 = ns.ip(&["-6", "route", "show"]);
    assert!(routes6.contains("default via fd78::1 dev eth0"), "{routes6}");

    let neighbours = ns.ip(&["neigh", "show", "dev", "eth0"]);
    assert!(neighbours.contains("10.78.0.1 lladdr 02:00:00:00:00:01 PERMANENT"), "{neighbours}");
}

#[test]
fn configure_applies_the_pod_network() {
    if !can_run("configure_applies_the_pod_network") {
        return;
    }
    let ns = guest_netns();
    ns.run_inside(|| configure(&config())).unwrap();
    assert_configured(&ns);
    // Applying it again (an agent retry) is fine and changes nothing.
    ns.run_inside(|| configure(&config())).unwrap();
    assert_configured(&ns);
}

#[test]
fn configure_names_the_mac_it_cannot_find() {
    if !can_run("configure_names_the_mac_it_cannot_find") {
        return;
    }
    let ns = guest_netns();
    let mut config = config();
    config.interfaces[1].mac = [2, 0, 0, 0, 0, 0xee];
    let err = ns.run_inside(move || configure(&config)).unwrap_err();
    assert!(matches!(err, NetError::NicNotFound { .. }), "{err}");
    assert!(err.to_string().contains("02:00:00:00:00:ee"), "{err}");
}

#[test]
fn loopback_comes_up_without_a_network() {
    if !can_run("loopback_comes_up_without_a_network") {
        return;
    }
    let ns = TestNetns::new();
    assert!(!ns.ip(&["link", "show", "lo"]).contains(",UP"));
    ns.run_inside(loopback_up).unwrap();
    assert!(ns.ip(&["link", "show", "lo"]).contains(",UP"));
    // Again: already up is fine.
    ns.run_inside(loopback_up).unwrap();
    // An empty configuration gives lo only.
    ns.run_inside(|| configure(&NetworkConfig::default())).unwrap();
}
