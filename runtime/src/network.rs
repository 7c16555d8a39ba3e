//! A sandbox's pod network: the taps connected to the interfaces CNI set up in the pod's
//! network namespace (Kata's "tcfilter" model, done by [`tern_netconf::host`]), handed to the VM
//! as virtio-net devices before it boots, and the configuration the agent applies in the guest.
//!
//! Dropping a [`SandboxNetwork`] disconnects the namespace again (the ingress qdiscs and
//! filters tern added go; the taps go with their last fd, the VM's). It must therefore drop
//! after the VM: [`crate::sandbox::Sandbox`] declares it after its VM handle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_netconf::host::{connect_pod_network, disconnect_pod_network};
use tern_netconf::NetError;
use tern_protocol::net::NetworkConfig;
use vmm::api::NetConfig;

/// Errors connecting a sandbox to its pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot connect the VM to the network namespace {}", netns.display())]
    Connect {
        netns: PathBuf,
        #[source]
        source: NetError,
    },
    #[error("interface {interface} has MTU {mtu}; a virtio-net device supports at most 65535")]
    Mtu { interface: String, mtu: u32 },
}

/// The taps of one sandbox and what the guest must configure.
#[derive(Debug)]
pub struct SandboxNetwork {
    netns: PathBuf,
    devices: Vec<NetConfig>,
    guest: NetworkConfig,
}

impl SandboxNetwork {
    /// Connect a tap to every addressed interface of the network namespace at `netns`
    /// (blocking: the work runs on a thread of its own inside that namespace).
    pub fn connect(netns: &Path) -> Result<SandboxNetwork, NetworkError> {
        let pod = connect_pod_network(netns)
            .map_err(|source| NetworkError::Connect { netns: netns.to_path_buf(), source })?;
        // From here on, dropping `network` undoes the host side.
        let mut network = SandboxNetwork { netns: netns.to_path_buf(), devices: Vec::new(), guest: pod.config };
        for nic in pod.nics {
            let mtu = u16::try_from(nic.mtu)
                .map_err(|_| NetworkError::Mtu { interface: nic.interface.clone(), mtu: nic.mtu })?;
            tracing::info!(
                interface = %nic.interface,
                tap = %nic.tap_name,
                mac = %tern_protocol::net::format_mac(&nic.mac),
                mtu,
                "pod interface connected to a tap"
            );
            network.devices.push(NetConfig { tap: Arc::new(nic.tap), mac: nic.mac, mtu, name: nic.tap_name });
        }
        if network.devices.is_empty() {
            tracing::info!(netns = %netns.display(), "no addressed interface in the network namespace; the guest gets lo only");
        }
        Ok(network)
    }

    /// The virtio-net devices for the VM (the taps are shared, not duplicated).
    pub fn vm_devices(&self) -> Vec<NetConfig> {
        self.devices.clone()
    }

    /// What the agent applies with `ConfigureNetwork`.
    pub fn guest_config(&self) -> &NetworkConfig {
        &self.guest
    }

    /// Whether the guest gets any NIC.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The network namespace this sandbox is connected to.
    pub fn netns(&self) -> &Path {
        &self.netns
    }
}

impl Drop for SandboxNetwork {
    fn drop(&mut self) {
        // Our references to the taps first; the VM's are gone once it stopped.
        self.devices.clear();
        if let Err(e) = disconnect_pod_network(&self.netns) {
            tracing::warn!(netns = %self.netns.display(), error = %crate::sandbox::error_chain(&e), "cannot disconnect the pod network");
        }
    }
}

/// Undo what a sandbox that died without its destructor (a SIGKILLed shim or `tern run`) left
/// in `netns`. Idempotent; a namespace that no longer exists has nothing left.
pub fn clean_dead_sandbox_network(netns: &Path) {
    match disconnect_pod_network(netns) {
        Ok(()) => tracing::info!(netns = %netns.display(), "pod network disconnected after a dead sandbox"),
        Err(e) => {
            tracing::warn!(netns = %netns.display(), error = %crate::sandbox::error_chain(&e), "cannot disconnect the pod network")
        }
    }
}
