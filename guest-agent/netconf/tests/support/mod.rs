//! Test network namespaces, set up and checked with iproute2 (the library never runs it).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether this machine can run the namespace tests: root, `ip` and `tc`. If not, say so
/// loudly; under `CI=true` that is a failure, never a silent pass.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "tc"].iter().all(|tool| Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success()));
    if root && tools {
        return true;
    }
    let why = if root { "iproute2 (ip, tc) is missing" } else { "not running as root" };
    eprintln!("\n!!!!!!!!!! {test}: SKIPPED: {why}: network namespace tests need both !!!!!!!!!!\n");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true: a skipped namespace test is a failure)");
    }
    false
}

/// Run a command; panic with its output if it fails. Returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, whether it succeeds or not; returns (success, stdout).
pub fn try_sh(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(_) => (false, String::new()),
    }
}

/// A uniquely named network namespace (`tern-t-<pid>-<n>`), deleted on drop (with the
/// host-side veth ends made for it), even when the test fails.
pub struct TestNetns {
    pub name: String,
    n: usize,
    host_links: Vec<String>,
}

impl TestNetns {
    pub fn new() -> TestNetns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("tern-t-{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        TestNetns { name, n, host_links: Vec::new() }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// `tc -n <ns> <args>`.
    pub fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("tc", &all)
    }

    /// A veth pair whose `inside` end is in the namespace and whose other end stays on the
    /// host (like CNI's), both up; returns the host end's name.
    pub fn add_veth(&mut self, inside: &str) -> String {
        let host = format!("tth{}x{}", std::process::id() % 100_000, self.n);
        self.host_links.push(host.clone());
        sh("ip", &["link", "add", &host, "type", "veth", "peer", "name", inside, "netns", &self.name]);
        sh("ip", &["link", "set", &host, "up"]);
        host
    }

    /// Run `f` on a thread inside the namespace.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        for link in &self.host_links {
            let _ = try_sh("ip", &["link", "del", link]);
        }
        let _ = try_sh("ip", &["netns", "del", &self.name]);
    }
}
