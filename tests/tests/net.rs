//! Pod networking without containerd: `tern run --netns` in a namespace with a veth (MTU 1400),
//! as CNI would leave it. The guest NIC must carry the veth's address, MAC and MTU; the guest
//! reaches an HTTP server on the host end of the veth and the host reaches one in the guest,
//! 64 MiB each way byte-identical; nothing of tern's stays in the namespace afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tern_tests::netns::{TestPodNetwork, TEST_MTU};
use tern_tests::{pseudo_random, require_linux_kvm, tern, tern_with_env, text, LiveTern};

/// One boot plus 128 MiB through an emulated NIC in the nested runner.
const LIMIT: Duration = Duration::from_secs(600);
const TRANSFER: usize = 64 << 20;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serve `body` once to the first GET on `listener` (HTTP/1.0, then close).
fn serve_once(listener: TcpListener, body: Vec<u8>) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept()?;
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request)?;
        write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
        conn.write_all(&body)?;
        conn.flush()
    })
}

/// GET `path` from `host:port`; the body.
fn http_get(host: &str, port: u16, path: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match TcpStream::connect((host, port)) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {host}:{port}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to {host}:{port}: {e}"),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    conn.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP header") + 4;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    response.split_off(split)
}

#[test]
fn guest_gets_the_veths_identity_and_moves_64_mib_each_way() {
    if !require_linux_kvm("guest_gets_the_veths_identity_and_moves_64_mib_each_way") {
        return;
    }
    let net = TestPodNetwork::new("a", 231);
    let mac = net.pod_mac();
    let listener = TcpListener::bind((net.gateway.as_str(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let to_guest = pseudo_random(TRANSFER);
    let to_guest_sha = hex(&Sha256::digest(&to_guest));
    let server = serve_once(listener, to_guest);

    let script = format!(
        "set -e; ip -o addr show dev eth0; ip -o link show dev eth0; ip route; ip -o link show dev lo; \
         echo FETCHED $(wget -q -O - http://{gw}:{port}/blob | sha256sum); \
         mkdir -p /www; head -c {TRANSFER} /dev/urandom > /www/blob; echo SERVED $(sha256sum /www/blob); \
         httpd -p 8080 -h /www; echo GUEST-SERVING; nc -l -p 8081 > /dev/null; echo GUEST-DONE",
        gw = net.gateway,
    );
    let netns = net.path();
    let mut guest =
        LiveTern::spawn(&["run", "--memory", "512", "--netns", &netns, "--", "sh", "-c", &script], &[], LIMIT);
    let served = guest.wait_for(LIMIT, |l| l.starts_with("SERVED "));
    guest.wait_for(Duration::from_secs(60), |l| l == "GUEST-SERVING");
    let from_guest = http_get(&net.pod_ip, 8080, "/blob");
    assert_eq!(from_guest.len(), TRANSFER, "bytes from the guest's server");
    let from_guest_sha = hex(&Sha256::digest(&from_guest));
    // Tell the guest we are done: its `nc -l` ends on our close.
    drop(TcpStream::connect((net.pod_ip.as_str(), 8081)).unwrap());
    let (code, lines) = guest.finish();
    let stdout = lines.join("\n");
    assert_eq!(code, Some(0), "stdout:\n{stdout}");
    server.join().unwrap().expect("the host server sent the blob");

    assert!(served.contains(&from_guest_sha), "guest file {served} vs received {from_guest_sha}");
    let fetched = lines.iter().find(|l| l.starts_with("FETCHED ")).expect("a FETCHED line");
    assert!(fetched.contains(&to_guest_sha), "guest received {fetched}, host sent {to_guest_sha}");
    let addr = lines.iter().find(|l| l.contains(" inet ")).unwrap_or_else(|| panic!("no IPv4 address:\n{stdout}"));
    assert!(addr.contains(&format!("inet {}/24", net.pod_ip)), "{addr}");
    let link =
        lines.iter().find(|l| l.contains("eth0:") && l.contains("mtu")).unwrap_or_else(|| panic!("no link:\n{stdout}"));
    assert!(link.contains(&format!("mtu {TEST_MTU}")), "{link}");
    assert!(link.contains(&format!("link/ether {mac}")), "guest NIC must carry the veth's MAC {mac}: {link}");
    assert!(stdout.contains(&format!("default via {} dev eth0", net.gateway)), "routes:\n{stdout}");
    let lo = lines.iter().find(|l| l.contains(" lo:")).unwrap_or_else(|| panic!("no lo:\n{stdout}"));
    assert!(lo.contains("UP"), "lo must be up: {lo}");

    assert_eq!(net.leftovers(), Vec::<String>::new(), "tern left state in the pod's namespace");
}

#[test]
fn without_netns_the_guest_has_lo_only() {
    if !require_linux_kvm("without_netns_the_guest_has_lo_only") {
        return;
    }
    let (out, _) = tern(&["run", "--", "sh", "-c", "ls /sys/class/net; ip -o link show lo"], b"", LIMIT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let mut names = stdout.lines().take_while(|l| !l.contains(':')).collect::<Vec<_>>();
    names.sort();
    assert_eq!(names, ["lo"], "{stdout}");
    assert!(stdout.contains("UP"), "lo must be up: {stdout}");
}

#[test]
fn bad_netns_paths_are_refused_by_name_and_leave_nothing() {
    if !require_linux_kvm("bad_netns_paths_are_refused_by_name_and_leave_nothing") {
        return;
    }
    let runs_before = std::fs::read_dir("/run/tern/vm").map(|d| d.count()).unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let file = file.to_string_lossy().into_owned();
    for (path, expect) in [
        ("/nonexistent/netns", "/nonexistent/netns"),
        (file.as_str(), file.as_str()),
        ("/proc/1/ns/net", "host network namespace"),
    ] {
        let (out, _) = tern(&["run", "--netns", path, "--", "true"], b"", LIMIT);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(125), "{path}: stderr: {stderr}");
        assert!(stderr.contains(expect), "{path}: the error must name {expect:?}: {stderr}");
    }
    let runs_after = std::fs::read_dir("/run/tern/vm").map(|d| d.count()).unwrap_or(0);
    assert_eq!(runs_before, runs_after, "a refused --netns left a run directory");
}

/// A SIGKILLed `tern run --netns` cannot undo its tc redirects (its taps die with it); the next
/// `tern run` reaps its run directory, which recorded the namespace, and disconnects it.
#[test]
fn the_next_run_disconnects_the_netns_of_a_sigkilled_tern() {
    if !require_linux_kvm("the_next_run_disconnects_the_netns_of_a_sigkilled_tern") {
        return;
    }
    let net = TestPodNetwork::new("k", 233);
    let base = tempfile::tempdir().unwrap();
    let env = [("TERN_RUN_DIR", base.path().to_str().unwrap())];
    let netns = net.path();
    let mut guest =
        LiveTern::spawn(&["run", "--netns", &netns, "--", "sh", "-c", "echo READY; sleep 600"], &env, LIMIT);
    guest.wait_for(LIMIT, |l| l == "READY");
    assert!(!net.leftovers().is_empty(), "tern's redirects must be in the namespace while it runs");
    guest.signal(libc::SIGKILL);
    assert!(guest.wait_exit(Duration::from_secs(30)).is_some(), "SIGKILL did not end tern");
    let left = net.leftovers();
    assert!(left.iter().all(|l| l.starts_with("qdisc")), "the tap must go with the process: {left:?}");
    assert!(!left.is_empty(), "nothing cleaned up yet: SIGKILL runs no destructor");

    let (out, _) = tern_with_env(&["run", "--", "true"], b"", LIMIT, &env);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out).1);
    assert_eq!(net.leftovers(), Vec::<String>::new(), "the next tern run left the dead run's tc state");
}
