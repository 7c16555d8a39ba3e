//! A container as the shim sees it: its OCI spec adapted for the guest's libcontainer (what
//! applies inside the VM kept, host-only parts dropped), and the host rootfs mounts
//! containerd asks the shim to make at `<bundle>/rootfs`.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// File systems the guest kernel provides itself: these spec mounts are made in the guest
/// (`cgroup` too: libcontainer maps it to the guest's cgroup v2).
const GUEST_FS_TYPES: [&str; 6] = ["proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2"];

/// Errors preparing a container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerSpecError {
    #[error("cannot read the OCI spec {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("the OCI spec has no process")]
    NoProcess,
    #[error("the OCI spec's process has no arguments")]
    NoArgs,
    #[error("terminal (tty) processes are not supported yet")]
    Terminal,
    #[error("cannot encode the adapted OCI spec")]
    Serialize(#[source] serde_json::Error),
    #[error("cannot mount the rootfs at {}: {message}", target.display())]
    MountRootfs { target: PathBuf, message: String },
}

/// Load `<bundle>/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, ContainerSpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| ContainerSpecError::Load { path, source })
}

/// What was dropped from a spec because it does not apply inside the VM (for the log).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub mounts: Vec<String>,
    pub namespaces: Vec<String>,
    /// Hooks, seccomp, LSM labels.
    pub other: Vec<&'static str>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.namespaces.is_empty() && self.other.is_empty()
    }
}

/// Adapt an OCI spec for the guest's libcontainer, with the rootfs at `guest_rootfs`:
/// host bind mounts (they need a share of their own: later), namespace paths (joining a pod's
/// namespaces comes with CRI), user namespaces, hooks (host binaries), seccomp (the agent is
/// built without libseccomp) and LSM labels are dropped. Returns the spec as JSON.
pub fn guest_spec(spec: &Spec, guest_rootfs: &str) -> Result<(String, Dropped), ContainerSpecError> {
    let mut spec = spec.clone();
    let process = spec.process().as_ref().ok_or(ContainerSpecError::NoProcess)?;
    if process.terminal().unwrap_or(false) {
        return Err(ContainerSpecError::Terminal);
    }
    if process.args().as_ref().is_none_or(Vec::is_empty) {
        return Err(ContainerSpecError::NoArgs);
    }
    let mut dropped = Dropped::default();
    let mut process = process.clone();
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        dropped.other.push("LSM labels");
        process.set_apparmor_profile(None).set_selinux_label(None);
    }
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from(guest_rootfs));
    spec.set_root(Some(root));
    let mounts: Vec<_> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| {
            let fs_type = m.typ().as_deref().unwrap_or("");
            let keep = GUEST_FS_TYPES.contains(&fs_type) || fs_type == "cgroup";
            if !keep {
                dropped.mounts.push(format!("{} ({fs_type})", m.destination().display()));
            }
            keep
        })
        .cloned()
        .collect();
    spec.set_mounts(Some(mounts));
    if spec.hooks().is_some() {
        dropped.other.push("hooks");
        spec.set_hooks(None);
    }
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(namespaces) = linux.namespaces().clone() {
            let kept = namespaces
                .into_iter()
                .filter(|ns| {
                    let keep = ns.path().is_none() && ns.typ() != LinuxNamespaceType::User;
                    if !keep {
                        dropped.namespaces.push(format!("{:?}", ns.typ()));
                    }
                    keep
                })
                .collect();
            linux.set_namespaces(Some(kept));
        }
        if linux.seccomp().is_some() {
            dropped.other.push("seccomp");
            linux.set_seccomp(None);
        }
        if linux.mount_label().is_some() {
            dropped.other.push("mount label");
            linux.set_mount_label(None);
        }
        spec.set_linux(Some(linux));
    }
    let json = serde_json::to_string(&spec).map_err(ContainerSpecError::Serialize)?;
    Ok((json, dropped))
}

/// One rootfs mount from containerd's `CreateTaskRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mount containerd's rootfs mounts (a snapshot) at `target`, in order. Blocking.
pub fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<(), ContainerSpecError> {
    for m in mounts {
        let fs_type = (!m.fs_type.is_empty()).then_some(m.fs_type.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target).map_err(|e| {
            ContainerSpecError::MountRootfs { target: target.to_path_buf(), message: e.to_string() }
        })?;
    }
    Ok(())
}

/// Undo [`mount_rootfs`]: detach every mount at `target` (the share is gone by now, and a
/// lazy detach cannot fail on a busy mount). Blocking; a missing mount is fine.
pub fn unmount_rootfs(target: &Path) {
    for _ in 0..8 {
        match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "cannot unmount the rootfs");
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 1, "gid": 2, "additionalGids": [3]},
                    "args": ["echo", "hello"], "env": ["PATH=/bin"], "cwd": "/work",
                    "noNewPrivileges": true},
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                                 {"type": "network", "path": "/proc/1/ns/net"}, {"type": "user"}]}
    }"#;

    fn spec(text: &str) -> Spec {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn spec_is_adapted_with_host_only_parts_dropped() {
        let (json, dropped) = guest_spec(&spec(SPEC), "/run/tern/containers/c1").unwrap();
        let back: Spec = serde_json::from_str(&json).unwrap();
        assert_eq!(back.root().as_ref().unwrap().path(), Path::new("/run/tern/containers/c1"));
        assert_eq!(back.root().as_ref().unwrap().readonly(), Some(true));
        let process = back.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref(), Some(&["echo".to_string(), "hello".to_string()][..]));
        assert_eq!(process.user().uid(), 1);
        let types: Vec<_> = back.mounts().iter().flatten().map(|m| m.typ().clone().unwrap_or_default()).collect();
        assert_eq!(types, ["proc", "cgroup"]);
        assert_eq!(dropped.mounts, ["/etc/hosts (bind)"]);
        let namespaces: Vec<_> =
            back.linux().as_ref().unwrap().namespaces().iter().flatten().map(|n| n.typ()).collect();
        assert_eq!(namespaces, [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount, LinuxNamespaceType::Uts]);
        assert_eq!(dropped.namespaces.len(), 2);
    }

    #[test]
    fn terminal_and_empty_args_are_refused() {
        let tty = SPEC.replace(r#""terminal": false"#, r#""terminal": true"#);
        assert!(matches!(guest_spec(&spec(&tty), "/r"), Err(ContainerSpecError::Terminal)));
        let no_args = SPEC.replace(r#""args": ["echo", "hello"]"#, r#""args": []"#);
        assert!(matches!(guest_spec(&spec(&no_args), "/r"), Err(ContainerSpecError::NoArgs)));
    }
}
