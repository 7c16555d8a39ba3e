//! What a share is ([`ShareConfig`]), how its name and host directory are checked, and how
//! its cache policy becomes a passthrough configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_backend_rs::passthrough::{CachePolicy as PassthroughCache, Config as PassthroughConfig};

/// Longest share name accepted (it becomes one directory entry in the guest).
pub const MAX_SHARE_NAME_LEN: usize = 64;

/// How much the guest may cache of a share's data and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Nothing is cached: every read and stat goes to the host (for trees the host changes).
    Never,
    /// Close-to-open consistency with short (1 s) attribute and entry timeouts.
    #[default]
    Auto,
    /// Data and metadata are cached for a long time (for trees only this guest changes).
    Always,
}

/// A cache policy name that is not `never`, `auto` or `always`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache policy {0:?} (never, auto or always)")]
pub struct UnknownCachePolicy(pub String);

impl std::str::FromStr for CachePolicy {
    type Err = UnknownCachePolicy;

    /// The names used in the runtime's configuration (`fs.cache`) and by `tern fs-serve --cache`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "never" => Ok(CachePolicy::Never),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            other => Err(UnknownCachePolicy(other.to_owned())),
        }
    }
}

impl CachePolicy {
    /// Entry and attribute timeout handed to the guest with each lookup.
    fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        }
    }
}

/// One host directory presented to the guest at `GUEST_SHARES_ROOT/<name>` through the VM's
/// virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// A single safe path component (see `validate_share_name`); unique within the VM.
    pub name: String,
    /// The host directory; it must exist when the share is added.
    pub host_dir: PathBuf,
    /// Refuse every change from the guest with EROFS.
    pub read_only: bool,
    /// What the guest may cache.
    pub cache: CachePolicy,
    /// The host tree is watched and changes are pushed to the guest agent (watchable mounts).
    pub watch: bool,
}

/// Errors adding or removing a share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The name is empty, too long, `.`/`..`, or contains `/`, NUL or control characters.
    #[error("share name {0:?} is not a single safe path component")]
    InvalidName(String),
    /// A share with this name is already present.
    #[error("a share named {0:?} already exists")]
    Duplicate(String),
    /// No share has this name.
    #[error("no share named {0:?}")]
    Unknown(String),
    /// The host directory does not exist or cannot be inspected.
    #[error("host directory {path} is missing")]
    HostDirMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The host path exists but is not a directory.
    #[error("host path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The VM has no virtio-fs device (see `VmConfig::fs_device`).
    #[error("the VM has no virtio-fs device")]
    NoDevice,
    /// The passthrough file system could not be opened on the host directory.
    #[error("cannot serve host directory {path}")]
    Passthrough {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The share could not be mounted into or unmounted from the device's tree.
    #[error("cannot update the device's share tree: {0}")]
    Vfs(String),
}

/// A share name must be one directory entry: non-empty, at most [`MAX_SHARE_NAME_LEN`] bytes,
/// not `.` or `..`, and free of `/`, NUL and control characters.
pub fn validate_share_name(name: &str) -> Result<(), ShareError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SHARE_NAME_LEN
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ShareError::InvalidName(name.to_owned()))
    }
}

/// The host directory must exist and be a directory (symlinks to one are followed here, once,
/// by the host administrator's choice; the guest never makes the host follow a link).
pub fn validate_host_dir(path: &Path) -> Result<(), ShareError> {
    let meta =
        std::fs::metadata(path).map_err(|source| ShareError::HostDirMissing { path: path.to_path_buf(), source })?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(ShareError::NotADirectory(path.to_path_buf()))
    }
}

impl ShareConfig {
    /// Check the name and the host directory.
    pub fn validate(&self) -> Result<(), ShareError> {
        validate_share_name(&self.name)?;
        validate_host_dir(&self.host_dir)
    }

    /// The passthrough configuration serving this share.
    pub(crate) fn passthrough_config(&self) -> Result<PassthroughConfig, ShareError> {
        let root_dir = self
            .host_dir
            .to_str()
            .ok_or_else(|| ShareError::Passthrough {
                path: self.host_dir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
            })?
            .to_owned();
        let timeout = self.cache.timeout();
        Ok(PassthroughConfig {
            root_dir,
            cache_policy: match self.cache {
                CachePolicy::Never => PassthroughCache::Never,
                CachePolicy::Auto => PassthroughCache::Auto,
                CachePolicy::Always => PassthroughCache::Always,
            },
            attr_timeout: timeout,
            entry_timeout: timeout,
            // Writeback caching lets the guest reorder and delay writes the host may be reading.
            writeback: false,
            // xattrs would let the guest set e.g. security.capability on host files.
            xattr: false,
            // Under a Vfs: the caller imports the root before mounting, and INIT takes the
            // options the Vfs negotiated (as Dragonball does).
            do_import: false,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            // O_PATH fds need no CAP_DAC_READ_SEARCH, unlike file handles.
            inode_file_handles: false,
            seal_size: false,
            dax_file_size: None,
            ..PassthroughConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_policies_parse_by_name() {
        assert_eq!("never".parse(), Ok(CachePolicy::Never));
        assert_eq!("auto".parse(), Ok(CachePolicy::Auto));
        assert_eq!("always".parse(), Ok(CachePolicy::Always));
        assert_eq!("Auto".parse::<CachePolicy>(), Err(UnknownCachePolicy("Auto".into())));
    }

    #[test]
    fn share_names_are_single_safe_components() {
        for good in ["s0", "volume-1", "a.b", "ünï"] {
            assert!(validate_share_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_SHARE_NAME_LEN + 1);
        for bad in ["", ".", "..", "a/b", "/", "a\0b", "a\nb", long.as_str()] {
            assert!(matches!(validate_share_name(bad), Err(ShareError::InvalidName(_))), "{bad:?}");
        }
    }

    #[test]
    fn host_dir_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(validate_host_dir(dir.path()).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(validate_host_dir(&file), Err(ShareError::NotADirectory(_))));
        assert!(matches!(validate_host_dir(&dir.path().join("missing")), Err(ShareError::HostDirMissing { .. })));
    }

    #[test]
    fn cache_policy_maps_to_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let mut share = ShareConfig {
            name: "s0".into(),
            host_dir: dir.path().to_path_buf(),
            read_only: false,
            cache: CachePolicy::Never,
            watch: false,
        };
        let never = share.passthrough_config().unwrap();
        assert_eq!(never.attr_timeout, Duration::ZERO);
        assert_eq!(never.cache_policy, PassthroughCache::Never);
        assert!(!never.writeback);
        share.cache = CachePolicy::Always;
        assert_eq!(share.passthrough_config().unwrap().cache_policy, PassthroughCache::Always);
    }
}
