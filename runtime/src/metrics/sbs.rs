//! The sandbox directory: `<root>/sbs/<sandbox-id>/`, one per running shim, holding its
//! `shim-monitor.sock`.
//!
//! It is the source of truth for which sandboxes exist (`tern monitor` watches `<root>/sbs`
//! with inotify): the shim creates it when its VM has booted and removes it when the sandbox
//! shuts down, and `containerd-shim-tern-v2 delete` removes it after a shim that was killed.

use std::path::{Path, PathBuf};

/// Subdirectory of the root holding one directory per sandbox.
pub const SBS_DIR: &str = "sbs";
/// The shim's metrics socket inside its sandbox directory.
pub const MONITOR_SOCKET: &str = "shim-monitor.sock";
/// Longest sandbox id accepted as a directory name.
const MAX_ID_LEN: usize = 255;

/// Errors creating or removing a sandbox directory.
#[derive(Debug, thiserror::Error)]
pub enum SbsDirError {
    #[error("sandbox id {0:?} cannot be a directory name")]
    BadId(String),
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot remove {}", .0.display())]
    Remove(PathBuf, #[source] std::io::Error),
}

/// `<root>/sbs`.
pub fn sbs_root(root: &Path) -> PathBuf {
    root.join(SBS_DIR)
}

/// Is `id` usable as one path component?
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id != "." && id != ".." && !id.contains('/') && !id.contains('\0')
}

/// One sandbox's directory. Not removed on drop: the shim decides when the sandbox is gone.
#[derive(Debug, Clone)]
pub struct SbsDir {
    path: PathBuf,
}

impl SbsDir {
    /// Create (or reuse) `<root>/sbs/<id>`.
    pub fn create(root: &Path, id: &str) -> Result<SbsDir, SbsDirError> {
        let path = Self::path_of(root, id)?;
        std::fs::create_dir_all(&path).map_err(|e| SbsDirError::Create(path.clone(), e))?;
        Ok(SbsDir { path })
    }

    /// Where sandbox `id`'s directory is (whether or not it exists).
    pub fn path_of(root: &Path, id: &str) -> Result<PathBuf, SbsDirError> {
        if !valid_sandbox_id(id) {
            return Err(SbsDirError::BadId(id.to_owned()));
        }
        Ok(sbs_root(root).join(id))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metrics socket path.
    pub fn monitor_socket(&self) -> PathBuf {
        self.path.join(MONITOR_SOCKET)
    }

    /// Remove the directory and everything in it; a missing directory is fine.
    pub fn remove(&self) -> Result<(), SbsDirError> {
        remove_dir(&self.path)
    }
}

/// Remove sandbox `id`'s directory under `root` if it exists (cleanup after a dead shim).
pub fn remove_sandbox_dir(root: &Path, id: &str) -> Result<(), SbsDirError> {
    remove_dir(&SbsDir::path_of(root, id)?)
}

fn remove_dir(path: &Path) -> Result<(), SbsDirError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SbsDirError::Remove(path.to_owned(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_one_component() {
        assert!(valid_sandbox_id("abc-123"));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(!valid_sandbox_id(bad), "{bad:?}");
        }
        assert!(!valid_sandbox_id(&"x".repeat(256)));
    }

    #[test]
    fn create_and_remove() {
        let root = tempfile::tempdir().unwrap();
        let dir = SbsDir::create(root.path(), "sb1").unwrap();
        assert_eq!(dir.path(), root.path().join("sbs/sb1"));
        assert_eq!(dir.monitor_socket(), root.path().join("sbs/sb1/shim-monitor.sock"));
        std::fs::write(dir.monitor_socket(), b"").unwrap();
        dir.remove().unwrap();
        assert!(!dir.path().exists());
        dir.remove().unwrap();
        remove_sandbox_dir(root.path(), "sb1").unwrap();
        assert!(remove_sandbox_dir(root.path(), "../x").is_err());
    }
}
