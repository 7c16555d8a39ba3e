//! `--share HOST:GUEST[:ro|:rw][:watch]`: parsing, checking, and turning each share into the
//! VMM's [`ShareConfig`] plus the agent's [`MountRequest`].
//!
//! Shares are named `s0`, `s1`, … in command-line order. A share is watchable (a tmpfs mirror
//! in the guest kept fresh by change records) when `:watch` is given or when its host path is
//! a kubelet secret, configMap, projected or downward-API volume; otherwise it is a bind mount
//! of the virtio-fs share.

use std::path::{Component, Path, PathBuf};

use tern_protocol::MountRequest;
use vmm::api::{CachePolicy, ShareConfig, VmmError};

use crate::agent::AgentError;
use crate::config::FsSection;
use crate::sandbox::{error_chain, Sandbox};

/// Path markers of kubelet volumes whose contents are swapped atomically and must be watched.
pub const KUBELET_WATCHABLE_MARKERS: [&str; 4] =
    ["kubernetes.io~secret", "kubernetes.io~configmap", "kubernetes.io~projected", "kubernetes.io~downward-api"];

/// Errors in a `--share` argument.
#[derive(Debug, thiserror::Error)]
pub enum ShareArgError {
    #[error("--share {0:?}: expected HOST:GUEST[:ro|:rw][:watch]")]
    Syntax(String),
    #[error("--share {arg:?}: unknown option {option:?} (ro, rw or watch)")]
    UnknownOption { arg: String, option: String },
    #[error("--share {0:?}: both ro and rw given")]
    ConflictingAccess(String),
    #[error("--share {arg:?}: guest path {path:?} must be absolute and free of `..`")]
    GuestPath { arg: String, path: String },
    #[error("--share {arg:?}: host directory {} does not exist", path.display())]
    HostMissing { arg: String, path: PathBuf, source: std::io::Error },
    #[error("--share {arg:?}: host path {} is not a directory", path.display())]
    HostNotDirectory { arg: String, path: PathBuf },
    #[error("--share: guest path {0:?} is used twice")]
    DuplicateGuestPath(String),
}

/// One parsed `--share` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The host directory, made absolute.
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    pub read_only: bool,
    /// `:watch` was given or the host path is a kubelet watchable volume.
    pub watch: bool,
}

/// A share ready for the VMM and the agent: the two halves always agree on its name, access
/// and watchability, because [`PlannedShare::new`] is the only place that builds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedShare {
    pub config: ShareConfig,
    pub mount: MountRequest,
}

impl PlannedShare {
    /// `host_dir` shared as `name` and mounted by the agent at `guest_path`. It is cached as
    /// `fs.cache` says, except a watchable share: the mirror must read what the host has now,
    /// and a cached `..data` lookup or file size would settle it to stale contents that no later
    /// record corrects.
    pub fn new(
        name: impl Into<String>,
        host_dir: PathBuf,
        guest_path: impl Into<String>,
        read_only: bool,
        watch: bool,
        fs: &FsSection,
    ) -> Self {
        let name = name.into();
        PlannedShare {
            config: ShareConfig {
                name: name.clone(),
                host_dir,
                read_only,
                cache: if watch { CachePolicy::Never } else { fs.cache },
                watch,
            },
            mount: MountRequest {
                share: name,
                guest_path: guest_path.into(),
                read_only,
                watchable: watch,
                watch_mode: fs.watch_mode,
            },
        }
    }

    /// The same share, never cached (for files the host rewrites in place).
    pub fn uncached(mut self) -> Self {
        self.config.cache = CachePolicy::Never;
        self
    }
}

/// Errors adding a share to a running VM.
#[derive(Debug, thiserror::Error)]
pub enum AddShareError {
    #[error("cannot share {} with the VM", host.display())]
    Share {
        host: PathBuf,
        #[source]
        source: VmmError,
    },
    #[error("cannot mount share {share} at {guest_path} in the guest")]
    Mount {
        share: String,
        guest_path: String,
        #[source]
        source: AgentError,
    },
}

/// Add `share` to `sandbox`'s running VM and have the agent mount it; on error nothing of it is
/// left. Blocking.
pub fn add_and_mount(sandbox: &Sandbox, share: PlannedShare) -> Result<(), AddShareError> {
    let PlannedShare { config, mount } = share;
    let host = config.host_dir.clone();
    let name = config.name.clone();
    sandbox.add_fs_share(config).map_err(|source| AddShareError::Share { host, source })?;
    let guest_path = mount.guest_path.clone();
    if let Err(source) = sandbox.agent().mount(mount) {
        if let Err(e) = sandbox.remove_fs_share(&name) {
            tracing::warn!(share = %name, error = %error_chain(&e), "cannot remove a share");
        }
        return Err(AddShareError::Mount { share: name, guest_path, source });
    }
    tracing::debug!(share = %name, %guest_path, "share added and mounted");
    Ok(())
}

/// Whether `path` is a kubelet volume whose updates must reach the guest as events.
pub fn is_kubelet_watchable(path: &Path) -> bool {
    let text = path.to_string_lossy();
    KUBELET_WATCHABLE_MARKERS.iter().any(|marker| text.contains(marker))
}

/// An absolute guest path without `..` (`.` and repeated slashes are harmless).
pub fn valid_guest_path(path: &str) -> bool {
    let path = Path::new(path);
    path.is_absolute() && path.components().all(|c| !matches!(c, Component::ParentDir)) && !path.as_os_str().is_empty()
}

/// Parse `HOST:GUEST[:ro|:rw][:watch]` and check the host directory exists.
pub fn parse_share_arg(arg: &str) -> Result<ShareSpec, ShareArgError> {
    let mut fields = arg.split(':');
    let (Some(host), Some(guest)) = (fields.next(), fields.next()) else {
        return Err(ShareArgError::Syntax(arg.into()));
    };
    if host.is_empty() || guest.is_empty() {
        return Err(ShareArgError::Syntax(arg.into()));
    }
    let (mut ro, mut rw, mut watch) = (false, false, false);
    for option in fields {
        match option {
            "ro" => ro = true,
            "rw" => rw = true,
            "watch" => watch = true,
            other => return Err(ShareArgError::UnknownOption { arg: arg.into(), option: other.into() }),
        }
    }
    if ro && rw {
        return Err(ShareArgError::ConflictingAccess(arg.into()));
    }
    if !valid_guest_path(guest) {
        return Err(ShareArgError::GuestPath { arg: arg.into(), path: guest.into() });
    }
    let host_path = PathBuf::from(host);
    let meta = std::fs::metadata(&host_path).map_err(|source| ShareArgError::HostMissing {
        arg: arg.into(),
        path: host_path.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ShareArgError::HostNotDirectory { arg: arg.into(), path: host_path });
    }
    // Absolute, so the VMM's view does not depend on the working directory.
    let host = std::path::absolute(&host_path).unwrap_or(host_path);
    let watch = watch || is_kubelet_watchable(&host);
    Ok(ShareSpec { host, guest: guest.into(), read_only: ro, watch })
}

/// Name the shares `s0`, `s1`, … and build their VMM and agent halves.
pub fn plan_shares(specs: &[ShareSpec], fs: &FsSection) -> Result<Vec<PlannedShare>, ShareArgError> {
    let mut planned: Vec<PlannedShare> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        if planned.iter().any(|p| Path::new(&p.mount.guest_path) == Path::new(&spec.guest)) {
            return Err(ShareArgError::DuplicateGuestPath(spec.guest.clone()));
        }
        planned.push(PlannedShare::new(
            format!("s{index}"),
            spec.host.clone(),
            spec.guest.clone(),
            spec.read_only,
            spec.watch,
            fs,
        ));
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::WatchMode;
    use vmm::api::CachePolicy;

    fn dir() -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_str().unwrap().to_owned();
        (d, p)
    }

    #[test]
    fn options_parse_with_rw_default() {
        let (_d, host) = dir();
        let s = parse_share_arg(&format!("{host}:/data")).unwrap();
        assert_eq!((s.guest.as_str(), s.read_only, s.watch), ("/data", false, false));
        assert!(s.host.is_absolute());
        let s = parse_share_arg(&format!("{host}:/data:ro:watch")).unwrap();
        assert!(s.read_only && s.watch);
        assert!(!parse_share_arg(&format!("{host}:/data:rw")).unwrap().read_only);
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let (d, host) = dir();
        assert!(matches!(parse_share_arg(&host), Err(ShareArgError::Syntax(_))));
        assert!(matches!(parse_share_arg(":/x"), Err(ShareArgError::Syntax(_))));
        assert!(matches!(parse_share_arg(&format!("{host}:/x:rx")), Err(ShareArgError::UnknownOption { .. })));
        assert!(matches!(parse_share_arg(&format!("{host}:/x:ro:rw")), Err(ShareArgError::ConflictingAccess(_))));
        for guest in ["relative", "/a/../b", ".."] {
            assert!(
                matches!(parse_share_arg(&format!("{host}:{guest}")), Err(ShareArgError::GuestPath { .. })),
                "{guest}"
            );
        }
        let missing = format!("{host}/nope:/x");
        let err = parse_share_arg(&missing).unwrap_err();
        assert!(matches!(err, ShareArgError::HostMissing { .. }));
        assert!(err.to_string().contains("does not exist"), "{err}");
        let file = d.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            parse_share_arg(&format!("{}:/x", file.display())),
            Err(ShareArgError::HostNotDirectory { .. })
        ));
    }

    #[test]
    fn kubelet_volumes_are_watchable() {
        let d = tempfile::tempdir().unwrap();
        for marker in KUBELET_WATCHABLE_MARKERS {
            let vol = d.path().join("pods/uid/volumes").join(marker).join("v");
            std::fs::create_dir_all(&vol).unwrap();
            assert!(parse_share_arg(&format!("{}:/etc/v", vol.display())).unwrap().watch, "{marker}");
        }
        let plain = d.path().join("pods/uid/volumes/kubernetes.io~empty-dir/v");
        std::fs::create_dir_all(&plain).unwrap();
        assert!(!parse_share_arg(&format!("{}:/v", plain.display())).unwrap().watch);
    }

    #[test]
    fn plan_names_shares_in_order_and_carries_settings() {
        let (_d, host) = dir();
        let specs = vec![
            parse_share_arg(&format!("{host}:/a")).unwrap(),
            parse_share_arg(&format!("{host}:/b:ro:watch")).unwrap(),
        ];
        let fs = FsSection { cache: CachePolicy::Never, watch_mode: WatchMode::Poll, ..FsSection::default() };
        let plan = plan_shares(&specs, &fs).unwrap();
        assert_eq!(plan[0].config.name, "s0");
        assert_eq!(plan[1].mount.share, "s1");
        assert_eq!(plan[1].config.cache, CachePolicy::Never);
        assert!(plan[1].config.watch && plan[1].mount.watchable && plan[1].mount.read_only);
        assert_eq!(plan[1].mount.watch_mode, WatchMode::Poll);
        let dup = vec![specs[0].clone(), specs[0].clone()];
        assert!(matches!(plan_shares(&dup, &fs), Err(ShareArgError::DuplicateGuestPath(_))));
    }

    #[test]
    fn a_planned_share_is_cached_as_configured_unless_watched_or_made_uncached() {
        let fs = FsSection { cache: CachePolicy::Always, ..FsSection::default() };
        let plain = PlannedShare::new("c1", PathBuf::from("/srv/a"), "/run/a", true, false, &fs);
        assert_eq!(plain.config.cache, CachePolicy::Always);
        assert_eq!((plain.mount.share.as_str(), plain.mount.guest_path.as_str()), ("c1", "/run/a"));
        assert!(plain.config.read_only && plain.mount.read_only && !plain.mount.watchable);
        let watched = PlannedShare::new("w1", PathBuf::from("/srv/b"), "/run/b", false, true, &fs);
        assert_eq!(watched.config.cache, CachePolicy::Never);
        assert!(watched.config.watch && watched.mount.watchable);
        assert_eq!(plain.uncached().config.cache, CachePolicy::Never);
    }
}
