//! The shim never blocks on its guest (issue 11): a stuck agent request blocks no other Task
//! request, and two `Create`s of one id at the same moment give one container and one
//! ALREADY_EXISTS with nothing left behind.
//!
//! containerd serializes a task's requests, so these tests talk to the shim's ttrpc socket
//! themselves (the address the shim records in its bundle), after `ctr run -d` started the
//! shim and its VM. The stuck request comes from the agent's test hook: with
//! `$TERN_TEST_AGENT_STALL=container_stats` in containerd's (and so the shim's) environment,
//! the shim boots its VM with `tern.test_stall=container_stats` and the agent never answers
//! a container's `Stats`.
// Tests may unwrap (common rules); a failed setup step should stop the test right there.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use containerd_shim_protos::api;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::TaskClient;
use tern_tests::containerd::{ctr_run_args, stderr, TestContainerd, NAMESPACE};

/// One `ctr` call that may include a VM boot.
const LIMIT: Duration = Duration::from_secs(180);
/// What "answers at once" means here, also under the nested runner's emulation.
const PROMPT: Duration = Duration::from_secs(1);
/// The shim's bound on one agent request (`agent::RPC_TIMEOUT`) plus slack.
const STUCK_LIMIT: Duration = Duration::from_secs(90);
/// The shim's environment variable for the agent's stall hook.
const STALL_ENV: &str = "TERN_TEST_AGENT_STALL";

fn bundle(ctrd: &TestContainerd, id: &str) -> PathBuf {
    ctrd.dir().join("state/io.containerd.runtime.v2.task").join(NAMESPACE).join(id)
}

/// A Task API client on the shim that serves task `id`.
fn shim_client(ctrd: &TestContainerd, id: &str) -> TaskClient {
    let address = std::fs::read_to_string(bundle(ctrd, id).join("address")).unwrap();
    TaskClient::new(ttrpc::Client::connect(address.trim()).unwrap())
}

fn ctx(limit: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(limit.as_nanos() as i64)
}

/// The ttrpc code and message of a failed call.
fn status_of(e: &ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
        other => panic!("not a ttrpc status: {other:?}"),
    }
}

/// `ctr run -d` of a container that sleeps, which boots the shim and its VM.
fn run_sleeper(ctrd: &TestContainerd, id: &str) {
    let args = ctr_run_args(&["-d"], id, &["sleep", "100000"]);
    let out = ctrd.ctr(&args, LIMIT);
    assert!(out.status.success(), "ctr run -d: {}\n{}", stderr(&out), ctrd.logs());
}

/// Mounts whose mount point is exactly `path`.
fn mounts_at(path: &Path) -> usize {
    let path = path.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter(|l| l.split(' ').nth(4) == Some(&*path)).count()
}

/// Time one call and require it to answer within [`PROMPT`].
fn prompt<T>(what: &str, ctrd: &TestContainerd, call: impl FnOnce() -> Result<T, ttrpc::Error>) -> T {
    let started = Instant::now();
    let result = call();
    let took = started.elapsed();
    let value = result.unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", ctrd.logs()));
    assert!(took <= PROMPT, "{what} took {took:?} while an agent request was stuck\n{}", ctrd.logs());
    eprintln!("{what}: {took:?}");
    value
}

/// Let containerd forget a task the test deleted behind its back, and check nothing is left.
fn clean_up(ctrd: &TestContainerd, id: &str) {
    let _ = ctrd.ctr(&["task", "kill", "--signal", "SIGKILL", id], LIMIT);
    let _ = ctrd.ctr(&["task", "delete", id], LIMIT);
    let _ = ctrd.ctr(&["container", "delete", id], LIMIT);
    assert!(ctrd.wait_no_shims(Duration::from_secs(60)), "a shim outlived its tasks\n{}", ctrd.logs());
    assert_eq!(ctrd.mounts_left(), Vec::<String>::new(), "mounts left behind\n{}", ctrd.logs());
}

#[test]
fn a_stuck_agent_request_blocks_no_other_task_request() {
    // containerd passes its environment on to the shims it starts; this binary's tests run one
    // at a time (`--test-threads=1` in the runner), and the variable goes again right away.
    std::env::set_var(STALL_ENV, "container_stats");
    let ctrd = tern_tests::containerd::containerd_for_test("a_stuck_agent_request_blocks_no_other_task_request");
    std::env::remove_var(STALL_ENV);
    let Some(ctrd) = ctrd else { return };
    run_sleeper(&ctrd, "stuck");
    let task = shim_client(&ctrd, "stuck");

    // The stuck request: Stats asks the agent for the container's cgroup statistics.
    let stats = {
        let task = task.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let req = api::StatsRequest { id: "stuck".into(), ..Default::default() };
            let result = task.stats(ctx(STUCK_LIMIT * 2), &req);
            (result, started.elapsed())
        })
    };
    // Wait until the agent holds it (it logs each stalled request on the console).
    let console = ctrd.dir().join("console.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console).unwrap_or_default().contains("stalling the request") {
        assert!(Instant::now() < deadline, "the agent never stalled the Stats request\n{}", ctrd.logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    let state = prompt("State", &ctrd, || {
        task.state(ctx(PROMPT * 10), &api::StateRequest { id: "stuck".into(), ..Default::default() })
    });
    assert_eq!(state.status.enum_value_or_default(), api::Status::RUNNING, "{state:?}");
    let pids = prompt("Pids", &ctrd, || {
        task.pids(ctx(PROMPT * 10), &api::PidsRequest { id: "stuck".into(), ..Default::default() })
    });
    assert!(!pids.processes.is_empty(), "no processes listed: {pids:?}");
    let kill = api::KillRequest { id: "stuck".into(), signal: 9, ..Default::default() };
    prompt("Kill", &ctrd, || task.kill(ctx(PROMPT * 10), &kill));
    // The exit travels from the guest on its own; State answers at once while it does.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = prompt("State", &ctrd, || {
            task.state(ctx(PROMPT * 10), &api::StateRequest { id: "stuck".into(), ..Default::default() })
        });
        if state.status.enum_value_or_default() == api::Status::STOPPED {
            break;
        }
        assert!(Instant::now() < deadline, "SIGKILL did not stop the container\n{}", ctrd.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let waited = prompt("Wait", &ctrd, || {
        task.wait(ctx(PROMPT * 10), &api::WaitRequest { id: "stuck".into(), ..Default::default() })
    });
    assert_eq!(waited.exit_status, 137, "{waited:?}");
    prompt("Delete", &ctrd, || {
        task.delete(ctx(PROMPT * 10), &api::DeleteRequest { id: "stuck".into(), ..Default::default() })
    });

    // The stuck request ends on its own, as a timeout that names the agent request.
    let (result, took) = stats.join().unwrap();
    let err = result.err().unwrap_or_else(|| panic!("Stats answered although the agent stalled it\n{}", ctrd.logs()));
    let (code, message) = status_of(&err);
    assert_eq!(code, Code::DEADLINE_EXCEEDED, "{message}");
    assert!(message.contains("container_stats"), "the timeout does not name the request: {message}");
    assert!(took < STUCK_LIMIT, "Stats took {took:?}");
    eprintln!("stuck Stats ended after {took:?}: {message}");
    // containerd never learnt of the Delete, so it would not send the `Shutdown` that ends an
    // empty shim: send it here (the reply may be lost as the shim exits).
    let _ = task.shutdown(ctx(LIMIT), &api::ShutdownRequest { id: "stuck".into(), ..Default::default() });
    clean_up(&ctrd, "stuck");
}

#[test]
fn two_creates_of_one_id_give_one_container_and_one_already_exists() {
    std::env::remove_var(STALL_ENV);
    let Some(ctrd) =
        tern_tests::containerd::containerd_for_test("two_creates_of_one_id_give_one_container_and_one_already_exists")
    else {
        return;
    };
    run_sleeper(&ctrd, "host");
    // A bundle of our own for the twin: the sleeper's spec, a bind-mounted rootfs.
    let twin = ctrd.dir().join("twin");
    let source = ctrd.dir().join("twin-source");
    std::fs::create_dir_all(twin.join("rootfs")).unwrap();
    std::fs::create_dir_all(source.join("bin")).unwrap();
    std::fs::copy(bundle(&ctrd, "host").join("config.json"), twin.join("config.json")).unwrap();
    let rootfs = twin.join("rootfs");
    let create = api::CreateTaskRequest {
        id: "twin".into(),
        bundle: twin.to_string_lossy().into_owned(),
        rootfs: vec![containerd_shim_protos::types::mount::Mount {
            type_: "bind".into(),
            source: source.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }],
        ..Default::default()
    };

    for round in 0..2 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (task, create, barrier) = (shim_client(&ctrd, "host"), create.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    task.create(ctx(LIMIT), &create)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}\n{}", ctrd.logs());
        let (code, message) = status_of(results.iter().find_map(|r| r.as_ref().err()).unwrap());
        assert_eq!(code, Code::ALREADY_EXISTS, "round {round}: {message}");
        // The loser touched nothing: one rootfs mount, not two stacked.
        assert_eq!(mounts_at(&rootfs), 1, "round {round}: rootfs mounts after the race");

        let task = shim_client(&ctrd, "host");
        task.delete(ctx(LIMIT), &api::DeleteRequest { id: "twin".into(), ..Default::default() })
            .unwrap_or_else(|e| panic!("round {round}: Delete: {e:?}\n{}", ctrd.logs()));
        assert_eq!(mounts_at(&rootfs), 0, "round {round}: the rootfs stayed mounted");
        let gone = task.state(ctx(LIMIT), &api::StateRequest { id: "twin".into(), ..Default::default() });
        let (code, _) = status_of(&gone.err().unwrap());
        assert_eq!(code, Code::NOT_FOUND, "round {round}: the twin outlived its Delete");
        // Round 1 creates the same id again: a guest mount or share the first round left
        // behind would make it fail (the agent refuses a second mount at the same path).
    }
    clean_up(&ctrd, "host");
}
