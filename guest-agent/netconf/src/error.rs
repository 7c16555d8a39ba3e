//! The one error type of the crate.

use nix::errno::Errno;
use std::path::PathBuf;

/// What can go wrong connecting a pod network on the host or configuring it in the guest.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace {} does not exist", path.display())]
    NetnsMissing { path: PathBuf },
    #[error("cannot open network namespace {}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a network namespace", path.display())]
    NotANetns { path: PathBuf },
    #[error(
        "{} is the host's network namespace: tern cannot share the host network namespace \
         (hostNetwork pods are not supported)",
        path.display()
    )]
    HostNetns { path: PathBuf },
    #[error("cannot enter network namespace {}", path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot start the thread that works inside the network namespace")]
    SpawnWorker(#[source] std::io::Error),
    #[error("the thread working inside the network namespace panicked")]
    WorkerPanicked,
    #[error("/dev/net/tun does not exist (is the tun module loaded?)")]
    TunMissing,
    #[error("cannot create tap {name}")]
    CreateTap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface} has MTU {mtu}; a virtio-net device supports at most 65535")]
    MtuTooLarge { interface: String, mtu: u32 },
    #[error("interface {interface} has no usable MAC address (not an Ethernet device?)")]
    NoMac { interface: String },
    #[error("the pod network is over the limit of {limit} interfaces, addresses, routes or neighbours per list")]
    TooLarge { limit: usize },
    #[error("no guest NIC has MAC {mac}")]
    NicNotFound { mac: String },
    #[error("no interface is named {name}")]
    LinkNotFound { name: String },
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink I/O failed while trying to {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode the kernel's answer to {what}")]
    Decode {
        what: String,
        #[source]
        source: netlink_packet_core::DecodeError,
    },
    #[error("the kernel's answer to {what} is malformed: {problem}")]
    Protocol { what: String, problem: String },
    #[error("cannot {what}{}", kernel_message.as_deref().map(|m| format!(" (kernel: {m})")).unwrap_or_default())]
    Netlink {
        what: String,
        #[source]
        errno: Errno,
        /// The kernel's extended-ack text, when it sent one.
        kernel_message: Option<String>,
    },
}

impl NetError {
    /// The errno of a refused netlink request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetError::Netlink { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
