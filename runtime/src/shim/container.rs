//! A container as the shim sees it: its OCI spec adapted for the guest's libcontainer (what
//! applies inside the VM kept, host-only parts dropped or translated), the host rootfs mounts
//! containerd asks the shim to make at `<bundle>/rootfs`, and the host bind mounts of the spec
//! (CRI's `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, `/dev/shm`, volumes) turned into
//! virtio-fs shares.
//!
//! # Host bind mounts
//!
//! A bind mount's source is a host path the guest cannot see. [`host_binds`] classifies each:
//! - a **directory** gets a share of its own, mounted by the agent at a guest path that the
//!   adapted spec then bind-mounts into the container (read-only stays read-only: the share,
//!   the agent's mount and the container's bind all say so). A kubelet secret, configMap,
//!   projected or downward-API volume is a *watchable* mount (the agent's tmpfs mirror kept
//!   fresh by change records), so atomic `..data` swaps reach the container;
//! - a **single file** is bind-mounted on the host onto an empty file in the container's
//!   private staging directory `<bundle>/tern-files/` (Kata's way): that directory is shared,
//!   so the guest sees exactly these files and nothing else of their parent directories, and
//!   writes (e.g. `/dev/termination-log`) land in the real host file;
//! - anything else (sockets, devices) cannot cross virtio-fs and is dropped with a log line.
//!
//! # Pod namespaces
//!
//! CRI puts the pod's namespaces into a container's spec as `/proc/<sandbox pid>/ns/<type>`
//! (the pid the shim reported for the pause container, which is a *guest* pid) and the pause
//! container's network namespace as a host netns file. [`guest_spec_for`] keeps a namespace
//! path only when it names `/proc/<pid>/ns/…` of a process of this VM (then libcontainer
//! joins it in the guest, so the pod's containers share IPC and UTS as on a plain host) and
//! drops other paths (the container then shares the VM's namespace of that type: the VM *is*
//! the pod's network boundary).
//!
//! # Seccomp
//!
//! `linux.seccomp` is kept: the agent's libcontainer loads it in the container's init as runc
//! would. [`guest_spec_for`] checks it first with libseccomp (`tern-seccomp`), so a profile tern
//! cannot enforce (an unknown syscall name, `SCMP_ACT_NOTIFY`, …) fails Create by name instead
//! of running the container unfiltered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// OCI annotation with the CRI container type (`sandbox` or `container`).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The per-container host directory holding single-file bind sources, under the bundle.
pub const HOST_FILES_DIR: &str = "tern-files";

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
    #[error("cannot encode the adapted OCI spec")]
    Serialize(#[source] serde_json::Error),
    #[error("cannot mount the rootfs at {}: {message}", target.display())]
    MountRootfs { target: PathBuf, message: String },
    #[error("bind mount {destination}: source {} is not usable: {message}", path.display())]
    BindSource { destination: String, path: PathBuf, message: String },
    #[error("cannot stage {} for the guest at {}", from.display(), target.display())]
    StageFile {
        from: PathBuf,
        target: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "the pod asks for the host's network namespace (hostNetwork); tern runs every pod in its own VM \
         and cannot share the host network namespace"
    )]
    HostNetwork,
    #[error("the container's seccomp profile cannot be enforced")]
    Seccomp(#[source] tern_seccomp::ProfileError),
}

/// The network namespace a sandbox's VM is connected to, from the spec that boots it: the path
/// of its `network` namespace (CRI's pod netns, or `ctr run --with-ns network:PATH`). A
/// `network` namespace without a path is a new, empty one: the guest gets `lo` only. A CRI pod
/// sandbox with no `network` namespace at all is a hostNetwork pod, which tern refuses.
pub fn network_namespace(spec: &Spec) -> Result<Option<PathBuf>, ContainerSpecError> {
    let network = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|namespaces| namespaces.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network));
    match network {
        Some(ns) => Ok(ns.path().clone()),
        None if is_cri_sandbox(spec) => Err(ContainerSpecError::HostNetwork),
        None => Ok(None),
    }
}

/// Whether the spec says this container is a pod's sandbox (pause) container.
pub fn is_cri_sandbox(spec: &Spec) -> bool {
    spec.annotations().as_ref().and_then(|a| a.get(CRI_CONTAINER_TYPE)).is_some_and(|t| t == "sandbox")
}

/// What a host bind source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    Dir,
    File,
}

/// One host bind mount of a spec (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Position in the spec's `mounts`.
    pub index: usize,
    /// The source with symlinks resolved (CRI: "runtimes should follow the symlink").
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
    pub kind: BindKind,
    /// A kubelet volume whose updates must reach the guest as events.
    pub watchable: bool,
}

fn is_bind(m: &Mount) -> bool {
    let typ = m.typ().as_deref().unwrap_or("");
    let bind_option = m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
    typ == "bind" || ((typ.is_empty() || typ == "none") && bind_option)
}

/// The spec's host bind mounts that can become shares, plus the destinations of those that
/// cannot (not a directory or regular file). A source that does not exist is an error, as it
/// is for runc. Blocking (stats the sources).
pub fn host_binds(spec: &Spec) -> Result<(Vec<HostBind>, Vec<String>), ContainerSpecError> {
    let mut binds = Vec::new();
    let mut skipped = Vec::new();
    for (index, m) in spec.mounts().iter().flatten().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let destination = m.destination().to_string_lossy().into_owned();
        let Some(source) = m.source().as_ref() else {
            skipped.push(format!("{destination} (bind without source)"));
            continue;
        };
        let bad = |message: String| ContainerSpecError::BindSource {
            destination: destination.clone(),
            path: source.clone(),
            message,
        };
        let resolved = std::fs::canonicalize(source).map_err(|e| bad(e.to_string()))?;
        let meta = std::fs::metadata(&resolved).map_err(|e| bad(e.to_string()))?;
        let kind = if meta.is_dir() {
            BindKind::Dir
        } else if meta.is_file() {
            BindKind::File
        } else {
            skipped.push(format!("{destination} (bind of {}: not a directory or file)", resolved.display()));
            continue;
        };
        let read_only = m.options().iter().flatten().any(|o| o == "ro");
        // Judged on the path as given: kubelet's volume directory, not where a symlink leads.
        let watchable = kind == BindKind::Dir && crate::share::is_kubelet_watchable(source);
        binds.push(HostBind { index, source: resolved, destination, read_only, kind, watchable });
    }
    Ok((binds, skipped))
}

/// The name under [`HOST_FILES_DIR`] (and in the guest's files share) of a file bind.
pub fn staged_file_name(bind: &HostBind) -> String {
    let base = bind.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}-{base}", bind.index)
}

/// Bind-mount the file source of `bind` onto an empty file in `files_dir` (read-only if the
/// mount is), so the guest can reach exactly that file through a share of `files_dir`.
/// Blocking. On error nothing is left mounted.
pub fn stage_file(files_dir: &Path, bind: &HostBind) -> Result<PathBuf, ContainerSpecError> {
    use nix::mount::{mount, MsFlags};
    let target = files_dir.join(staged_file_name(bind));
    let err = |error: std::io::Error| ContainerSpecError::StageFile {
        from: bind.source.clone(),
        target: target.clone(),
        error,
    };
    std::fs::create_dir_all(files_dir).map_err(err)?;
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&target).map_err(err)?;
    mount(Some(&bind.source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| err(e.into()))?;
    if bind.read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, &target, None::<&str>, flags, None::<&str>) {
            unmount_all(&target);
            return Err(err(e.into()));
        }
    }
    Ok(target)
}

/// Undo every [`stage_file`] under `files_dir` and remove it; a missing directory is fine.
/// Blocking. Also used by `shim delete` after a shim died.
pub fn remove_staged_files(files_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(files_dir) else { return };
    for entry in entries.flatten() {
        unmount_all(&entry.path());
    }
    if let Err(e) = std::fs::remove_dir_all(files_dir) {
        tracing::warn!(dir = %files_dir.display(), error = %e, "cannot remove the staged bind files");
    }
}

/// Detach every mount stacked at `target`.
fn unmount_all(target: &Path) {
    unmount_rootfs(target);
}

/// How [`guest_spec_for`] translates host-only parts of a spec.
#[derive(Debug, Default, Clone)]
pub struct GuestAdaptation {
    /// Spec mount index → the guest path now holding that bind mount's source.
    pub binds: HashMap<usize, String>,
    /// Guest pids of this VM's processes whose `/proc/<pid>/ns/*` may be joined.
    pub joinable_pids: Vec<u32>,
}

/// Whether `path` is `/proc/<pid>/ns/<name>` for one of `pids`.
fn joinable_ns_path(path: &Path, pids: &[u32]) -> bool {
    let mut parts = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
    let (Some(root), Some(proc_), Some(pid), Some(ns), Some(_name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    root == "/" && proc_ == "proc" && ns == "ns" && pid.parse::<u32>().is_ok_and(|p| p != 0 && pids.contains(&p))
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
    /// Hooks, LSM labels.
    pub other: Vec<&'static str>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.namespaces.is_empty() && self.other.is_empty()
    }
}

/// [`guest_spec_for`] without bind translations or joinable namespaces: every host bind mount
/// and namespace path is dropped.
pub fn guest_spec(spec: &Spec, guest_rootfs: &str) -> Result<(String, Dropped), ContainerSpecError> {
    guest_spec_for(spec, guest_rootfs, &GuestAdaptation::default())
}

/// Adapt an OCI spec for the guest's libcontainer, with the rootfs at `guest_rootfs`: host
/// bind mounts named in `adapt.binds` get their guest source, other host mounts are dropped;
/// namespace paths are kept only for `/proc/<pid>/ns/*` of `adapt.joinable_pids` (module
/// docs); user namespaces, hooks (host binaries) and LSM labels are dropped; the seccomp profile
/// is kept after a check (module docs). Returns the spec as JSON.
pub fn guest_spec_for(
    spec: &Spec,
    guest_rootfs: &str,
    adapt: &GuestAdaptation,
) -> Result<(String, Dropped), ContainerSpecError> {
    let mut spec = spec.clone();
    let process = spec.process().as_ref().ok_or(ContainerSpecError::NoProcess)?;
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
        .enumerate()
        .filter_map(|(index, m)| {
            if let Some(guest_source) = adapt.binds.get(&index) {
                let mut m = m.clone();
                m.set_source(Some(PathBuf::from(guest_source))).set_typ(Some("bind".to_owned()));
                return Some(m);
            }
            let fs_type = m.typ().as_deref().unwrap_or("");
            let keep = GUEST_FS_TYPES.contains(&fs_type) || fs_type == "cgroup";
            if !keep {
                dropped.mounts.push(format!("{} ({fs_type})", m.destination().display()));
            }
            keep.then(|| m.clone())
        })
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
                    let path_ok = ns.path().as_ref().is_none_or(|p| joinable_ns_path(p, &adapt.joinable_pids));
                    let keep = path_ok && ns.typ() != LinuxNamespaceType::User;
                    if !keep {
                        dropped.namespaces.push(format!("{:?}", ns.typ()));
                    }
                    keep
                })
                .collect();
            linux.set_namespaces(Some(kept));
        }
        if let Some(seccomp) = linux.seccomp() {
            let profile = serde_json::to_value(seccomp).map_err(ContainerSpecError::Serialize)?;
            tern_seccomp::check_profile(&profile).map_err(ContainerSpecError::Seccomp)?;
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
        containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target)
            .map_err(|e| ContainerSpecError::MountRootfs { target: target.to_path_buf(), message: e.to_string() })?;
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
    fn the_network_namespace_comes_from_the_spec_and_host_network_pods_are_refused() {
        let with_path = SPEC.replace("/proc/1/ns/net", "/var/run/netns/cni-1");
        assert_eq!(network_namespace(&spec(&with_path)).unwrap(), Some(PathBuf::from("/var/run/netns/cni-1")));
        let new_netns = SPEC.replace(r#"{"type": "network", "path": "/proc/1/ns/net"}"#, r#"{"type": "network"}"#);
        assert_eq!(network_namespace(&spec(&new_netns)).unwrap(), None);
        let host = SPEC.replace(r#"{"type": "network", "path": "/proc/1/ns/net"}, "#, "");
        assert_eq!(network_namespace(&spec(&host)).unwrap(), None, "a plain container on the host network: lo only");
        let host_pod = host.replace(
            r#""hostname": "box","#,
            r#""hostname": "box", "annotations": {"io.kubernetes.cri.container-type": "sandbox"},"#,
        );
        let err = network_namespace(&spec(&host_pod)).unwrap_err();
        assert!(err.to_string().contains("cannot share the host network namespace"), "{err}");
    }

    #[test]
    fn terminal_is_kept_and_empty_args_are_refused() {
        // A terminal process gets its pty in the guest (the agent's console socket).
        let tty = SPEC.replace(r#""terminal": false"#, r#""terminal": true"#);
        let (json, _) = guest_spec(&spec(&tty), "/r").unwrap();
        let back: Spec = serde_json::from_str(&json).unwrap();
        assert_eq!(back.process().as_ref().unwrap().terminal(), Some(true));
        let no_args = SPEC.replace(r#""args": ["echo", "hello"]"#, r#""args": []"#);
        assert!(matches!(guest_spec(&spec(&no_args), "/r"), Err(ContainerSpecError::NoArgs)));
    }

    #[test]
    fn the_seccomp_profile_is_kept_and_one_tern_cannot_enforce_fails_by_name() {
        let profile = r#""seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["read", "_llseek"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}]}"#;
        let with = SPEC.replace(r#""linux": {"#, &format!(r#""linux": {{{profile}, "#));
        let (json, dropped) = guest_spec(&spec(&with), "/r").unwrap();
        assert!(dropped.other.is_empty(), "{dropped:?}");
        let back: Spec = serde_json::from_str(&json).unwrap();
        let seccomp = back.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(seccomp.syscalls().as_ref().unwrap()[1].errno_ret(), Some(42));
        let unknown = with.replace(r#"["sethostname"]"#, r#"["sethostname", "sethostnam"]"#);
        let err = guest_spec(&spec(&unknown), "/r").unwrap_err();
        assert!(matches!(err, ContainerSpecError::Seccomp(_)), "{err:?}");
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("\"sethostnam\""), "{chain}");
        let notify =
            with.replace(r#""errnoRet": 42"#, r#""errnoRet": 42}, {"names": ["mount"], "action": "SCMP_ACT_NOTIFY""#);
        let err = guest_spec(&spec(&notify), "/r").unwrap_err();
        assert!(std::error::Error::source(&err).unwrap().to_string().contains("SCMP_ACT_NOTIFY"), "{err:?}");
    }

    fn spec_with_mounts(mounts: &str, namespaces: &str) -> Spec {
        spec(&format!(
            r#"{{"ociVersion": "1.0.2", "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}},
                "root": {{"path": "rootfs"}}, "mounts": [{mounts}],
                "annotations": {{"io.kubernetes.cri.container-type": "container"}},
                "linux": {{"namespaces": [{namespaces}]}}}}"#
        ))
    }

    #[test]
    fn host_binds_are_classified() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("pod/volumes/kubernetes.io~secret/tok");
        std::fs::create_dir_all(&secret).unwrap();
        let plain = d.path().join("data");
        std::fs::create_dir_all(&plain).unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&plain, &link).unwrap();
        let sock = d.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let m = |dest: &str, src: &std::path::Path, opts: &str| {
            format!(
                r#"{{"destination": "{dest}", "type": "bind", "source": "{}", "options": [{opts}]}}"#,
                src.display()
            )
        };
        let mounts = [
            r#"{"destination": "/proc", "type": "proc", "source": "proc"}"#.to_owned(),
            m("/etc/secret", &secret, r#""rbind", "ro""#),
            m("/data", &link, r#""rbind", "rw""#),
            m("/etc/hosts", &hosts, r#""rbind""#),
            m("/run/s.sock", &sock, r#""rbind""#),
            // `type` omitted, `bind` in the options: still a bind mount.
            format!(r#"{{"destination": "/d2", "source": "{}", "options": ["bind"]}}"#, plain.display()),
        ]
        .join(",");
        let s = spec_with_mounts(&mounts, "");
        assert!(!is_cri_sandbox(&s));
        let (binds, skipped) = host_binds(&s).unwrap();
        let summary: Vec<_> =
            binds.iter().map(|b| (b.index, b.destination.as_str(), b.kind, b.read_only, b.watchable)).collect();
        assert_eq!(
            summary,
            [
                (1, "/etc/secret", BindKind::Dir, true, true),
                (2, "/data", BindKind::Dir, false, false),
                (3, "/etc/hosts", BindKind::File, false, false),
                (5, "/d2", BindKind::Dir, false, false),
            ]
        );
        // Symlinks resolved.
        assert_eq!(binds[1].source, std::fs::canonicalize(&plain).unwrap());
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].starts_with("/run/s.sock"), "{skipped:?}");
        assert_eq!(staged_file_name(&binds[2]), "3-hosts");

        let missing = spec_with_mounts(&m("/x", &d.path().join("nope"), r#""rbind""#), "");
        let err = host_binds(&missing).unwrap_err();
        assert!(matches!(err, ContainerSpecError::BindSource { .. }), "{err}");
        assert!(err.to_string().contains("/x"), "{err}");
    }

    #[test]
    fn binds_get_guest_sources_and_only_vm_namespace_paths_are_joined() {
        let mounts = r#"{"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/cri/hosts", "options": ["rbind", "ro"]},
            {"destination": "/mnt/gone", "type": "bind", "source": "/host/only", "options": ["rbind"]}"#;
        let namespaces = r#"{"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "network", "path": "/proc/42/ns/net"},
            {"type": "mount"}, {"type": "cgroup", "path": "/proc/7/ns/cgroup"}"#;
        let s = spec_with_mounts(mounts, namespaces);
        let adapt = GuestAdaptation {
            binds: HashMap::from([(1, "/run/tern/mounts/c/files/1-hosts".to_owned())]),
            joinable_pids: vec![42],
        };
        let (json, dropped) = guest_spec_for(&s, "/run/tern/containers/c", &adapt).unwrap();
        let back: Spec = serde_json::from_str(&json).unwrap();
        let mounts: Vec<_> = back
            .mounts()
            .iter()
            .flatten()
            .map(|m| (m.destination().display().to_string(), m.source().clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/proc".to_owned(), PathBuf::from("proc")),
                ("/etc/hosts".to_owned(), PathBuf::from("/run/tern/mounts/c/files/1-hosts")),
            ]
        );
        let hosts = &back.mounts().as_ref().unwrap()[1];
        assert_eq!(hosts.typ().as_deref(), Some("bind"));
        assert!(hosts.options().as_ref().unwrap().contains(&"ro".to_owned()));
        assert_eq!(dropped.mounts, ["/mnt/gone (bind)"]);
        let ns: Vec<_> =
            back.linux().as_ref().unwrap().namespaces().iter().flatten().map(|n| (n.typ(), n.path().clone())).collect();
        assert_eq!(
            ns,
            [
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Ipc, Some(PathBuf::from("/proc/42/ns/ipc"))),
                (LinuxNamespaceType::Uts, Some(PathBuf::from("/proc/42/ns/uts"))),
                (LinuxNamespaceType::Network, Some(PathBuf::from("/proc/42/ns/net"))),
                (LinuxNamespaceType::Mount, None),
            ]
        );
        assert_eq!(dropped.namespaces, ["Cgroup"]);
        // Without joinable pids every path goes (the container gets the VM's namespace).
        let (_, dropped) = guest_spec(&s, "/r").unwrap();
        assert_eq!(dropped.namespaces.len(), 4);
    }

    #[test]
    fn namespace_paths_must_name_a_vm_process() {
        let ok = |p: &str| joinable_ns_path(Path::new(p), &[42]);
        assert!(ok("/proc/42/ns/net"));
        for bad in [
            "/proc/43/ns/net",
            "/proc/0/ns/net",
            "/var/run/netns/cni-1",
            "/proc/42/ns",
            "/proc/42/ns/net/x",
            "proc/42/ns/net",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    #[test]
    fn staged_files_are_bind_mounted_read_only_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("staged_files_are_bind_mounted_read_only_and_removed: needs root (mount), skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("resolv.conf");
        std::fs::write(&src, "nameserver 10.0.0.1\n").unwrap();
        let files = d.path().join("bundle").join(HOST_FILES_DIR);
        let bind = HostBind {
            index: 4,
            source: src.clone(),
            destination: "/etc/resolv.conf".into(),
            read_only: true,
            kind: BindKind::File,
            watchable: false,
        };
        let staged = stage_file(&files, &bind).unwrap();
        assert_eq!(staged, files.join("4-resolv.conf"));
        assert_eq!(std::fs::read_to_string(&staged).unwrap(), "nameserver 10.0.0.1\n");
        // Same file: a host update shows through; the staged view refuses writes.
        std::fs::write(&src, "nameserver 10.0.0.2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&staged).unwrap(), "nameserver 10.0.0.2\n");
        let w = std::fs::OpenOptions::new().write(true).open(&staged).unwrap_err();
        assert_eq!(w.raw_os_error(), Some(libc::EROFS), "{w}");
        remove_staged_files(&files);
        assert!(!files.exists());
        assert_eq!(std::fs::read_to_string(&src).unwrap(), "nameserver 10.0.0.2\n");
    }
}
