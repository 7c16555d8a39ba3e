//! Sandbox run directories: one per VM under the run base (`$TERN_RUN_DIR`, else
//! `/run/tern/vm`), holding its vsock socket.
//!
//! [`SandboxDir`] creates one and removes it when dropped. A process that is SIGKILLed runs no
//! destructor, so every directory also records its owner — the pid and the start time of the
//! process that made it (field 22 of `/proc/PID/stat`, which tells a reused pid apart) — and
//! [`reap_stale`], run by `tern run` and by the shim's `start`, removes the directories whose
//! owner is gone. The rules, for one `vm-*` (`tern run`) or `sb-*` (a shim's sandbox)
//! directory; nothing else in the base is touched:
//!
//! - with an owner record: kept while that process lives (same pid, same start time, not a
//!   zombie), removed once it does not;
//! - without one (a tern older than the record, or a creator that died between `mkdir` and
//!   writing it): removed once older than [`UNOWNED_MAX_AGE`];
//! - either way kept while something accepts connections on its `vsock.sock`: a VM is alive
//!   there, in a process this one cannot see (another pid namespace sharing the base).
//!
//! A sandbox connected to a pod network also records its namespace's path ([`NETNS_RECORD`]):
//! the taps died with the owner, but the tc state it added to the pod's interfaces did not, so
//! reaping the directory disconnects that namespace first.
//!
//! Creating a directory (with its record) holds a shared `flock` on the base and reaping holds
//! an exclusive one, so a reaper never sees a directory between its `mkdir` and its record, and
//! never removes a directory that a new owner recreated (a shim replacing its dead
//! predecessor's) after it judged the old one.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// The owner record in every [`SandboxDir`]: `<pid> <start time in clock ticks>\n`.
const OWNER_RECORD: &str = "owner";
/// File in a named [`SandboxDir`] saying whose sandbox it is (for people; the name is a hash).
pub(crate) const SANDBOX_NAME_FILE: &str = "sandbox";
/// The network namespace a sandbox connected to (its path, one line), if any.
pub const NETNS_RECORD: &str = "netns";
/// The VM's hybrid vsock socket inside a run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Prefix of `tern run`'s private directories.
const PRIVATE_PREFIX: &str = "vm-";
/// Prefix of the shim's named directories.
const NAMED_PREFIX: &str = "sb-";
/// A directory without an owner record is reaped once it is this old (by its mtime) and its
/// socket does not answer. Generous: the record is written right after `mkdir`, so only a
/// creator that died in between, or a tern from before the record, leaves one without it.
pub const UNOWNED_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// Base of the sandbox run directories: `$TERN_RUN_DIR`, else `/run/tern/vm` when it can be
/// created, else `<temp dir>/tern-vm`. Deterministic for a given environment, so the shim's
/// `delete` finds the directories the shim made.
pub fn run_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("TERN_RUN_DIR") {
        return PathBuf::from(dir);
    }
    let run = PathBuf::from("/run/tern/vm");
    if std::fs::create_dir_all(&run).is_ok() {
        run
    } else {
        std::env::temp_dir().join("tern-vm")
    }
}

/// A process as it can be recognised later: its pid and its start time, so a pid the kernel
/// has reused for another process does not pass for the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot.
    pub start_time: u64,
}

impl ProcessIdentity {
    /// This process.
    pub fn current() -> std::io::Result<ProcessIdentity> {
        let pid = std::process::id() as i32;
        match ProcessIdentity::of(pid) {
            Some(ProcessState { identity, .. }) => Ok(identity),
            None => Err(std::io::Error::other("cannot read this process's /proc/self/stat")),
        }
    }

    /// Process `pid` as `/proc` shows it now, or None if there is none.
    fn of(pid: i32) -> Option<ProcessState> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (state, start_time) = parse_stat(&stat)?;
        Some(ProcessState { identity: ProcessIdentity { pid, start_time }, zombie: matches!(state, 'Z' | 'X') })
    }

    /// Whether this very process still runs (a zombie has released everything: not alive).
    pub fn is_alive(&self) -> bool {
        ProcessIdentity::of(self.pid).is_some_and(|p| p.identity == *self && !p.zombie)
    }

    fn record(&self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    fn parse_record(text: &str) -> Option<ProcessIdentity> {
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse().ok().filter(|&p: &i32| p > 0)?;
        let start_time = fields.next()?.parse().ok()?;
        fields.next().is_none().then_some(ProcessIdentity { pid, start_time })
    }
}

struct ProcessState {
    identity: ProcessIdentity,
    zombie: bool,
}

/// The state (field 3) and start time (field 22) of a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses: fields are counted
/// after the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state and the start time.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start_time))
}

/// The run base, locked (see the module docs); the lock goes with the value.
struct BaseLock(#[allow(dead_code)] Flock<File>);

fn lock_base(base: &Path, arg: FlockArg) -> std::io::Result<BaseLock> {
    std::fs::create_dir_all(base)?;
    let dir = File::open(base)?;
    Flock::lock(dir, arg).map(BaseLock).map_err(|(_, errno)| errno.into())
}

/// A sandbox's run directory (its sockets). Removed with everything in it when dropped.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    /// A fresh private directory with a random name (`tern run`, tests).
    pub fn private() -> std::io::Result<SandboxDir> {
        SandboxDir::private_in(&run_base())
    }

    fn private_in(base: &Path) -> std::io::Result<SandboxDir> {
        let _lock = lock_base(base, FlockArg::LockShared)?;
        let dir = tempfile::Builder::new().prefix(PRIVATE_PREFIX).tempdir_in(base)?;
        let dir = SandboxDir { path: dir.keep() };
        dir.write_owner()?;
        Ok(dir)
    }

    /// The directory of sandbox `id` in containerd namespace `namespace`:
    /// `<base>/sb-<24 hex digits of sha256(namespace/id)>`. Hashed because CRI sandbox ids are
    /// 64 characters and a unix socket path must stay under 108 bytes. A stale directory of the
    /// same sandbox (a shim killed before its `delete` ran) is replaced.
    pub fn named(namespace: &str, id: &str) -> std::io::Result<SandboxDir> {
        let path = SandboxDir::named_path(namespace, id);
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(run_base);
        let _lock = lock_base(&base, FlockArg::LockShared)?;
        if path.exists() {
            tracing::warn!(path = %path.display(), "replacing a stale sandbox run directory");
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        let dir = SandboxDir { path };
        dir.write_owner()?;
        std::fs::write(dir.path.join(SANDBOX_NAME_FILE), format!("{namespace}/{id}\n"))?;
        Ok(dir)
    }

    fn write_owner(&self) -> std::io::Result<()> {
        std::fs::write(self.path.join(OWNER_RECORD), ProcessIdentity::current()?.record())
    }

    /// Where [`SandboxDir::named`] puts sandbox `id` of `namespace`.
    pub fn named_path(namespace: &str, id: &str) -> PathBuf {
        let digest = Sha256::digest(format!("{namespace}/{id}").as_bytes());
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        run_base().join(format!("{NAMED_PREFIX}{hex}"))
    }

    /// Remove the named directory of a sandbox whose process died (containerd's `shim delete`).
    /// Returns whether there was one. Only for a dead owner: a live VM's socket would vanish.
    pub fn remove_named(namespace: &str, id: &str) -> std::io::Result<bool> {
        match std::fs::remove_dir_all(SandboxDir::named_path(namespace, id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record that this sandbox connected the network namespace at `netns`, so that reaping
    /// the directory after a SIGKILL also undoes that (module docs).
    pub fn record_netns(&self, netns: &Path) -> std::io::Result<()> {
        std::fs::write(self.path.join(NETNS_RECORD), format!("{}\n", netns.display()))
    }
}

impl SandboxDir {
    /// Remove the directory and what is in it (again at drop; a missing directory is fine).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the sandbox run directory");
            }
        }
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Why a run directory was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The recorded owner no longer runs (or its pid now belongs to another process).
    OwnerGone(ProcessIdentity),
    /// No owner record, older than [`UNOWNED_MAX_AGE`].
    Unowned,
}

/// Remove the run directories under [`run_base`] whose owner is gone (module docs). Best
/// effort: failures are logged, never returned; returns what was removed.
pub fn reap_stale() -> Vec<(PathBuf, StaleReason)> {
    reap_stale_in(&run_base(), SystemTime::now())
}

/// [`reap_stale`] for the directories under `base`, judging ages against `now`.
pub fn reap_stale_in(base: &Path, now: SystemTime) -> Vec<(PathBuf, StaleReason)> {
    let _lock = match lock_base(base, FlockArg::LockExclusive) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::debug!(base = %base.display(), error = %e, "cannot lock the run base; not reaping");
            return Vec::new();
        }
    };
    let entries = match std::fs::read_dir(base) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!(base = %base.display(), error = %e, "cannot list the run base; not reaping");
            return Vec::new();
        }
    };
    let mut reaped = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(PRIVATE_PREFIX) || name.starts_with(NAMED_PREFIX)) {
            continue;
        }
        let path = entry.path();
        let Some(reason) = staleness(&path, now) else { continue };
        disconnect_recorded_netns(&path);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), ?reason, "removed a stale sandbox run directory");
                reaped.push((path, reason));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale sandbox run directory"),
        }
    }
    reaped
}

/// Undo what the dead sandbox of the run directory at `path` left in its pod network namespace
/// (tern's ingress redirects), if it recorded one. Idempotent; a namespace that is gone has
/// nothing left.
fn disconnect_recorded_netns(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path.join(NETNS_RECORD)) else { return };
    let netns = Path::new(text.trim_end_matches('\n'));
    match tern_netconf::host::disconnect_pod_network(netns) {
        Ok(()) => tracing::info!(netns = %netns.display(), "disconnected the pod network of a dead sandbox"),
        Err(e) => {
            tracing::warn!(netns = %netns.display(), error = %e, "cannot disconnect the pod network of a dead sandbox")
        }
    }
}

/// Why the run directory at `path` is stale, or None if it must stay.
fn staleness(path: &Path, now: SystemTime) -> Option<StaleReason> {
    let meta = std::fs::symlink_metadata(path).ok().filter(|m| m.is_dir())?;
    let reason = match std::fs::read_to_string(path.join(OWNER_RECORD)) {
        Ok(text) => match ProcessIdentity::parse_record(&text) {
            Some(owner) if owner.is_alive() => return None,
            Some(owner) => StaleReason::OwnerGone(owner),
            None => unowned(&meta, now)?,
        },
        Err(_) => unowned(&meta, now)?,
    };
    if socket_answers(&path.join(VSOCK_SOCKET)) {
        tracing::debug!(path = %path.display(), ?reason, "a VM answers in a run directory whose owner looks gone; keeping it");
        return None;
    }
    Some(reason)
}

/// [`StaleReason::Unowned`] if the directory is past [`UNOWNED_MAX_AGE`].
fn unowned(meta: &std::fs::Metadata, now: SystemTime) -> Option<StaleReason> {
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(meta.mtime()).unwrap_or(0));
    let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
    (age > UNOWNED_MAX_AGE).then_some(StaleReason::Unowned)
}

/// Whether something accepts connections on the unix socket `path`. Non-blocking, so a
/// listener with a full backlog answers "yes" instead of stalling the reaper; anything but a
/// refusal or a missing socket counts as alive.
fn socket_answers(path: &Path) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let Ok(addr) = UnixAddr::new(path) else { return false };
    let sock =
        match socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None) {
            Ok(sock) => sock,
            Err(_) => return true,
        };
    match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
        Ok(()) => true,
        Err(Errno::ECONNREFUSED | Errno::ENOENT | Errno::ENOTDIR | Errno::ENOTSOCK) => false,
        Err(_) => true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn make_dir(base: &Path, name: &str, owner: Option<&str>) -> PathBuf {
        let path = base.join(name);
        std::fs::create_dir_all(&path).unwrap();
        if let Some(record) = owner {
            std::fs::write(path.join(OWNER_RECORD), record).unwrap();
        }
        path
    }

    /// A pid that no process has now (a child that was reaped).
    fn dead_pid() -> i32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        pid
    }

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 5 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("12 (x) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
        let me = ProcessIdentity::current().unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.is_alive());
        assert!(!ProcessIdentity { start_time: me.start_time + 1, ..me }.is_alive());
    }

    #[test]
    fn owner_records_round_trip_and_reject_garbage() {
        let id = ProcessIdentity { pid: 77, start_time: 123456 };
        assert_eq!(ProcessIdentity::parse_record(&id.record()), Some(id));
        for bad in ["", "77", "x 1", "0 5", "-3 5", "1 2 3"] {
            assert_eq!(ProcessIdentity::parse_record(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_live_owner_keeps_its_dir_and_a_dead_or_reused_pid_loses_it() {
        let base = tempfile::tempdir().unwrap();
        let me = ProcessIdentity::current().unwrap();
        let live = make_dir(base.path(), "vm-live", Some(&me.record()));
        let dead = make_dir(base.path(), "vm-dead", Some(&format!("{} 1\n", dead_pid())));
        // Our pid, another start time: the pid was reused by the process judging it.
        let reused_record = ProcessIdentity { start_time: me.start_time + 1, ..me }.record();
        let reused = make_dir(base.path(), "sb-0123456789abcdef01234567", Some(&reused_record));
        let reaped = reap_stale_in(base.path(), SystemTime::now());
        assert!(live.exists());
        assert!(!dead.exists() && !reused.exists(), "reaped: {reaped:?}");
        assert_eq!(reaped.len(), 2, "{reaped:?}");
        assert!(reaped.iter().all(|(_, r)| matches!(r, StaleReason::OwnerGone(_))));
    }

    #[test]
    fn a_zombie_owner_is_gone() {
        let base = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie, still in /proc with its start time.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let zombie = loop {
            if let Some(p) = ProcessIdentity::of(pid).filter(|p| p.zombie) {
                break p.identity;
            }
            assert!(std::time::Instant::now() < deadline, "the child never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        };
        let dir = make_dir(base.path(), "vm-zombie", Some(&zombie.record()));
        assert_eq!(reap_stale_in(base.path(), SystemTime::now()).len(), 1);
        assert!(!dir.exists());
        child.wait().unwrap();
    }

    #[test]
    fn an_unowned_dir_goes_only_when_old() {
        let base = tempfile::tempdir().unwrap();
        let young = make_dir(base.path(), "vm-young", None);
        let garbled = make_dir(base.path(), "vm-garbled", Some("not a record"));
        assert!(reap_stale_in(base.path(), SystemTime::now()).is_empty());
        assert!(young.exists() && garbled.exists());
        let later = SystemTime::now() + UNOWNED_MAX_AGE + Duration::from_secs(60);
        let reaped = reap_stale_in(base.path(), later);
        assert_eq!(reaped.len(), 2, "{reaped:?}");
        assert!(reaped.iter().all(|(_, r)| *r == StaleReason::Unowned));
        assert!(!young.exists() && !garbled.exists());
    }

    #[test]
    fn a_dir_whose_vm_answers_stays_whatever_its_record_says() {
        let base = tempfile::tempdir().unwrap();
        let dir = make_dir(base.path(), "sb-aaaaaaaaaaaaaaaaaaaaaaaa", Some(&format!("{} 1\n", dead_pid())));
        let listener = UnixListener::bind(dir.join(VSOCK_SOCKET)).unwrap();
        assert!(reap_stale_in(base.path(), SystemTime::now()).is_empty());
        assert!(dir.exists());
        // The VM is gone too: its socket file stays, nobody answers.
        drop(listener);
        assert_eq!(reap_stale_in(base.path(), SystemTime::now()).len(), 1);
        assert!(!dir.exists());
    }

    #[test]
    fn other_entries_in_the_base_are_left_alone() {
        let base = tempfile::tempdir().unwrap();
        let dead = format!("{} 1\n", dead_pid());
        let other = make_dir(base.path(), "not-a-sandbox", Some(&dead));
        std::fs::write(base.path().join("vm-file"), "a file, not a directory").unwrap();
        assert!(reap_stale_in(base.path(), SystemTime::now() + UNOWNED_MAX_AGE * 2).is_empty());
        assert!(other.exists() && base.path().join("vm-file").exists());
    }

    #[test]
    fn new_dirs_record_their_owner() {
        let base = tempfile::tempdir().unwrap();
        let dir = SandboxDir::private_in(base.path()).unwrap();
        let record = std::fs::read_to_string(dir.path().join(OWNER_RECORD)).unwrap();
        assert_eq!(ProcessIdentity::parse_record(&record), Some(ProcessIdentity::current().unwrap()));
        assert!(reap_stale_in(base.path(), SystemTime::now() + UNOWNED_MAX_AGE * 2).is_empty());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn named_dirs_are_deterministic_short_and_distinct() {
        let a = SandboxDir::named_path("k8s.io", &"f".repeat(64));
        assert_eq!(a, SandboxDir::named_path("k8s.io", &"f".repeat(64)));
        assert_ne!(a, SandboxDir::named_path("default", &"f".repeat(64)));
        assert_ne!(a, SandboxDir::named_path("k8s.io", &"e".repeat(64)));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("sb-") && name.len() == 3 + 24, "{name}");
    }

    #[test]
    fn a_named_dir_replaces_a_stale_one_and_goes_on_drop() {
        let id = format!("sandbox-unit-{}", std::process::id());
        let path = SandboxDir::named_path("tern-unit", &id);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("vsock.sock"), b"stale").unwrap();
        let dir = SandboxDir::named("tern-unit", &id).unwrap();
        assert_eq!(dir.path(), path);
        assert!(!path.join("vsock.sock").exists(), "stale content kept");
        assert_eq!(std::fs::read_to_string(path.join(SANDBOX_NAME_FILE)).unwrap(), format!("tern-unit/{id}\n"));
        drop(dir);
        assert!(!path.exists());
        assert!(!SandboxDir::remove_named("tern-unit", &id).unwrap());
    }
}
