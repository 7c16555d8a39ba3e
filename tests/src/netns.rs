//! Test pod networks: a network namespace with a veth whose pod end (`eth0`, MTU 1400) has an
//! address and a default route, its host end in the test's own namespace. Made with
//! iproute2 (test setup only; tern itself never runs `ip` or `tc`), removed on drop.

use std::process::Command;

/// MTU of both veth ends: not the default 1500, so a guest that got it proves it was copied.
pub const TEST_MTU: u32 = 1400;

/// Run `ip`/`tc` with `args`; panics with its stderr on failure.
#[allow(clippy::panic)]
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod-like network namespace (see the module docs).
pub struct TestPodNetwork {
    pub name: String,
    /// The veth end in the caller's namespace.
    pub host_if: String,
    /// `10.<subnet>.0.1`: the host end, the pod's gateway.
    pub gateway: String,
    /// `10.<subnet>.0.2`: the pod end, the address the guest must get.
    pub pod_ip: String,
}

impl TestPodNetwork {
    /// Create namespace `tern-t<pid>-<tag>` with subnet `10.<subnet>.0.0/24`.
    pub fn new(tag: &str, subnet: u8) -> TestPodNetwork {
        let pid = std::process::id();
        let name = format!("tern-t{pid}-{tag}");
        let host_if = format!("tv{}{tag}", pid % 100_000);
        assert!(host_if.len() <= 15, "interface name {host_if} too long");
        let gateway = format!("10.{subnet}.0.1");
        let pod_ip = format!("10.{subnet}.0.2");
        let mtu = TEST_MTU.to_string();
        let net = TestPodNetwork {
            name: name.clone(),
            host_if: host_if.clone(),
            gateway: gateway.clone(),
            pod_ip: pod_ip.clone(),
        };
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &[
                "link", "add", "name", &host_if, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
                "netns", &name,
            ],
        );
        sh("ip", &["addr", "add", &format!("{gateway}/24"), "dev", &host_if]);
        sh("ip", &["link", "set", &host_if, "up"]);
        sh("ip", &["-n", &name, "addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
        sh("ip", &["-n", &name, "link", "set", "eth0", "up"]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        sh("ip", &["-n", &name, "route", "add", "default", "via", &gateway]);
        net
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// The pod end's MAC, lowercase with colons.
    pub fn pod_mac(&self) -> String {
        let link = sh("ip", &["-n", &self.name, "-o", "link", "show", "dev", "eth0"]);
        link.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {link}"))
            .to_owned()
    }

    /// What tern left in the namespace that is not the test's: taps and ingress qdiscs (the
    /// mirred filters live under those qdiscs and go with them).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let links = sh("ip", &["-n", &self.name, "-o", "link", "show"]);
        left.extend(links.lines().filter(|l| l.contains("_tern")).map(|l| format!("link: {l}")));
        let qdiscs = sh("tc", &["-n", &self.name, "qdisc", "show"]);
        left.extend(qdiscs.lines().filter(|l| l.contains("ingress")).map(|l| format!("qdisc: {l}")));
        left
    }
}

impl Drop for TestPodNetwork {
    fn drop(&mut self) {
        // Deleting the namespace deletes the pod end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(std::process::Stdio::null()).status();
    }
}
