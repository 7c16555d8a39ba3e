//! The runtime configuration: a TOML file with documented defaults, overridable by CLI flags.
//!
//! Lookup order: `--config PATH`, then `$TERN_CONFIG`, then `/etc/tern/config.toml`; a missing
//! default file means "all defaults". See `runtime/config.example.toml` for every key.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tern_protocol::WatchMode;
use vmm::api::CachePolicy;
use vmm::api::SeccompMode;

/// Default system-wide config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tern/config.toml";
/// File name of the guest kernel installed next to the `tern` binary (by `make`).
pub const KERNEL_FILE_NAME: &str = "tern-vmlinux";
/// File name of the initramfs installed next to the `tern` binary (by `make`).
pub const INITRD_FILE_NAME: &str = "tern-initramfs.cpio";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Everything in the config file. Unknown keys are rejected so typos are caught.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub vm: VmSection,
    pub vmm: VmmSection,
    pub fs: FsSection,
    pub shim: ShimSection,
}

/// `[vmm]`: how the VMM's own threads (inside the shim) are confined.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmSection {
    /// What a VMM thread's seccomp filter does with a syscall outside its role's allowlist:
    /// "trap" (the syscall fails, the violation is logged and the VM ends with an error),
    /// "log" (the kernel logs it as an audit record and the syscall runs) or "off" (no
    /// filters, no capability drops).
    #[serde(deserialize_with = "seccomp_mode")]
    pub seccomp: SeccompMode,
}

/// `vmm.seccomp`: the VMM's [`SeccompMode`], by name.
fn seccomp_mode<'de, D: serde::Deserializer<'de>>(de: D) -> Result<SeccompMode, D::Error> {
    String::deserialize(de)?.parse().map_err(serde::de::Error::custom)
}

/// Default of `shim.root_dir`.
pub const DEFAULT_ROOT_DIR: &str = "/run/tern";

/// `[shim]`: where each sandbox's shim publishes itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimSection {
    /// Each running sandbox gets `<root_dir>/sbs/<sandbox-id>/` holding its metrics socket
    /// `shim-monitor.sock`; `tern monitor --sbs-root` must name `<root_dir>/sbs`.
    pub root_dir: PathBuf,
}

impl Default for ShimSection {
    fn default() -> Self {
        ShimSection { root_dir: PathBuf::from(DEFAULT_ROOT_DIR) }
    }
}

/// `[fs]`: host directories shared with the guest (virtio-fs) and watchable mounts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FsSection {
    /// What the guest may cache of a share: "never", "auto" (close-to-open, 1 s metadata) or
    /// "always" (for shares only the guest changes).
    #[serde(deserialize_with = "cache_policy")]
    pub cache: CachePolicy,
    /// How watchable mounts follow the host: "events" (the VMM pushes change records) or
    /// "poll" (the agent rescans every 2 s, like Kata; the benchmark baseline).
    pub watch_mode: WatchMode,
    /// Seconds between full resyncs of watchable mounts (the safety net under events).
    pub resync_interval_secs: u64,
}

impl Default for FsSection {
    fn default() -> Self {
        FsSection { cache: CachePolicy::Auto, watch_mode: WatchMode::Events, resync_interval_secs: 60 }
    }
}

/// `fs.cache`: the VMM's [`CachePolicy`], by name.
fn cache_policy<'de, D: serde::Deserializer<'de>>(de: D) -> Result<CachePolicy, D::Error> {
    String::deserialize(de)?.parse().map_err(serde::de::Error::custom)
}

/// `[vm]`: how each microVM is built.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    /// Guest kernel (ELF vmlinux or bzImage). Default: `tern-vmlinux` next to the binary.
    pub kernel: Option<PathBuf>,
    /// Initramfs with tern-agent as /init. Default: `tern-initramfs.cpio` next to the binary.
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Where the guest serial console goes: a file path, "stderr", or "" to discard.
    pub console_log: String,
    /// Extra kernel command line appended to tern's defaults.
    pub kernel_cmdline: String,
    /// How long to wait for the agent to answer after the VM starts.
    pub agent_timeout_secs: u64,
    /// Guest vsock CID.
    pub guest_cid: u32,
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            kernel: None,
            initrd: None,
            vcpus: 1,
            memory_mib: 256,
            console_log: String::new(),
            kernel_cmdline: String::new(),
            agent_timeout_secs: 60,
            guest_cid: 3,
        }
    }
}

impl Config {
    /// Load from an explicit path, `$TERN_CONFIG`, or the default path (missing default = defaults).
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os("TERN_CONFIG").map(PathBuf::from);
        let (path, must_exist) = match (explicit, env_path) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        config.validate()?;
        Ok(config)
    }

    /// Reject values the VMM would refuse anyway, with the config key in the message.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vm.vcpus == 0 || self.vm.vcpus > 32 {
            return Err(ConfigError::Invalid { key: "vm.vcpus", reason: "must be 1..=32".into() });
        }
        if self.vm.guest_cid < 3 {
            return Err(ConfigError::Invalid { key: "vm.guest_cid", reason: "CIDs 0-2 are reserved".into() });
        }
        if self.fs.resync_interval_secs == 0 {
            return Err(ConfigError::Invalid { key: "fs.resync_interval_secs", reason: "must be at least 1".into() });
        }
        if self.vm.agent_timeout_secs == 0 {
            return Err(ConfigError::Invalid { key: "vm.agent_timeout_secs", reason: "must be at least 1".into() });
        }
        Ok(())
    }

    /// The kernel path: configured, else `tern-vmlinux` next to the running binary.
    pub fn kernel_path(&self) -> PathBuf {
        self.vm.kernel.clone().unwrap_or_else(|| beside_executable(KERNEL_FILE_NAME))
    }

    /// The initramfs path: configured, else `tern-initramfs.cpio` next to the running binary.
    pub fn initrd_path(&self) -> PathBuf {
        self.vm.initrd.clone().unwrap_or_else(|| beside_executable(INITRD_FILE_NAME))
    }
}

/// `name` in the directory of the running executable (where `make` installs the guest files).
pub fn beside_executable(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let text = include_str!("../config.example.toml");
        let parsed: Config = toml::from_str(text).unwrap();
        let defaults = Config::default();
        assert_eq!(parsed.vm.vcpus, defaults.vm.vcpus);
        assert_eq!(parsed.vm.memory_mib, defaults.vm.memory_mib);
        assert_eq!(parsed.vm.agent_timeout_secs, defaults.vm.agent_timeout_secs);
        assert_eq!(parsed.vm.guest_cid, defaults.vm.guest_cid);
        assert_eq!(parsed.fs.cache, defaults.fs.cache);
        assert_eq!(parsed.fs.watch_mode, defaults.fs.watch_mode);
        assert_eq!(parsed.fs.resync_interval_secs, defaults.fs.resync_interval_secs);
        assert_eq!(parsed.shim.root_dir, defaults.shim.root_dir);
        assert_eq!(parsed.vmm.seccomp, defaults.vmm.seccomp);
    }

    #[test]
    fn shim_root_dir_parses() {
        let c: Config = toml::from_str("[shim]\nroot_dir = \"/tmp/x\"\n").unwrap();
        assert_eq!(c.shim.root_dir, PathBuf::from("/tmp/x"));
        assert_eq!(Config::default().shim.root_dir, PathBuf::from("/run/tern"));
    }

    #[test]
    fn fs_section_parses() {
        let c: Config =
            toml::from_str("[fs]\ncache = \"never\"\nwatch_mode = \"poll\"\nresync_interval_secs = 5\n").unwrap();
        assert_eq!(c.fs.cache, CachePolicy::Never);
        assert_eq!(c.fs.watch_mode, WatchMode::Poll);
        assert!(toml::from_str::<Config>("[fs]\ncache = \"sometimes\"\n").is_err());
        let mut c = Config::default();
        c.fs.resync_interval_secs = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "fs.resync_interval_secs", .. })));
    }

    #[test]
    fn vmm_seccomp_parses_and_defaults_to_trap() {
        assert_eq!(Config::default().vmm.seccomp, SeccompMode::Trap);
        let c: Config = toml::from_str("[vmm]\nseccomp = \"log\"\n").unwrap();
        assert_eq!(c.vmm.seccomp, SeccompMode::Log);
        let err = toml::from_str::<Config>("[vmm]\nseccomp = \"kill\"\n").unwrap_err().to_string();
        assert!(err.contains("\"trap\", \"log\" or \"off\""), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("[vm]\nvcpu = 2\n").is_err());
    }

    #[test]
    fn zero_vcpus_is_invalid() {
        let mut c = Config::default();
        c.vm.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { key: "vm.vcpus", .. })));
    }
}
