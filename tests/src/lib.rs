//! Shared helpers for tern's integration tests: where the built artifacts are, and the guard
//! that decides whether this host can boot Linux guests.
//!
//! KVM tests call [`require_linux_kvm`] first. Without a KVM that can boot Linux they print a
//! loud notice and return `false` (the test then returns early); with `CI=true` they panic, so
//! CI never passes silently without booting guests. `make test` runs them inside
//! `tests/nested-runner` on hosts whose KVM is `kvm_pvm`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `tern` binary under test: `$TERN_BIN`, else `target/release/tern`.
pub fn tern_bin() -> PathBuf {
    std::env::var_os("TERN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/tern"))
}

/// Why this host cannot boot Linux guests, or `None` if it can.
pub fn linux_kvm_unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("cannot open /dev/kvm: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is kvm_pvm, which cannot boot unmodified Linux guests".into());
    }
    None
}

/// Guard for tests that boot real guests. See the module docs.
pub fn require_linux_kvm(test: &str) -> bool {
    let Some(reason) = linux_kvm_unavailable() else {
        assert!(tern_bin().is_file(), "{} is missing: run `make build` first", tern_bin().display());
        return true;
    };
    let msg = format!(
        "\n*** {test}: NOT RUN — {reason}.\n*** Run the KVM tests through the nested-virt runner: `make test` (or tests/nested-runner -- cargo test -p tern-tests).\n"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}*** CI=true: a KVM test that cannot boot a guest is a failure.");
    }
    eprintln!("{msg}");
    false
}

/// Run `tern` with `args`, feeding `stdin`, killing it after `limit`. Returns output and elapsed.
pub fn tern(args: &[&str], stdin: &[u8], limit: Duration) -> (Output, Duration) {
    tern_with_env(args, stdin, limit, &[])
}

/// [`tern`] with extra environment variables.
pub fn tern_with_env(
    args: &[&str],
    stdin: &[u8],
    limit: Duration,
    env: &[(&str, &str)],
) -> (Output, Duration) {
    let start = Instant::now();
    let mut cmd = Command::new(tern_bin());
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {}: {e}", tern_bin().display()));
    let pid = child.id();
    // Bounded time: a watchdog kills a hung tern so the test fails instead of hanging.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on a pid we spawned; worst case it already exited and was reaped,
            // and the pid has not been recycled yet because we have not waited on it.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        if let Some(s) = child_stdin.as_mut() {
            let _ = s.write_all(&input);
        }
        drop(child_stdin);
    });
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for tern failed: {e}"));
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let _ = feeder.join();
    let elapsed = start.elapsed();
    assert!(elapsed < limit, "tern {args:?} did not finish within {limit:?} and was killed");
    (out, elapsed)
}

/// Lossy stdout/stderr as strings, for assertions and messages.
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
