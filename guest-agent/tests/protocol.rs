//! The whole agent protocol against the real `tern-agent` binary in `--unix-dir` mode.
//!
//! Each test starts its own agent in a temporary directory, waits for the ready marker on its
//! stdout, and talks to it exactly as the runtime does over vsock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use tern_protocol::{
    frame, recv, send, ErrorCode, ExecRequest, ExitStatus, Request, Response, StreamHello, StreamKind,
    PROTOCOL_VERSION, READY_MARKER,
};

/// Upper bound for any single blocking read in these tests, so a bug fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    _stdout: BufReader<ChildStdout>,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern-agent"))
            .arg("--unix-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{READY_MARKER}\n"), "agent did not announce readiness");
        Agent { child, dir, _stdout: stdout }
    }

    fn connect(&self, socket: &str) -> UnixStream {
        let conn = UnixStream::connect(self.dir.path().join(socket)).unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        conn
    }

    fn rpc(&self) -> UnixStream {
        self.connect("rpc.sock")
    }

    /// A stream connection for process `id`: hello sent, and the agent's answer to it.
    fn try_stream(&self, id: &str, stream: StreamKind) -> (UnixStream, Response) {
        let mut conn = self.connect("stream.sock");
        send(&mut conn, &StreamHello { id: id.into(), stream }).unwrap();
        let answer = recv(&mut conn).unwrap();
        (conn, answer)
    }

    /// A stream connection for process `id`, attached.
    fn stream(&self, id: &str, stream: StreamKind) -> UnixStream {
        let (conn, answer) = self.try_stream(id, stream);
        assert_eq!(answer, Response::Ok, "{id} {stream:?}");
        conn
    }

    fn read_stream(&self, id: &str, stream: StreamKind) -> Vec<u8> {
        let mut out = Vec::new();
        self.stream(id, stream).read_to_end(&mut out).unwrap();
        out
    }

    fn exec(&self, conn: &mut UnixStream, id: &str, argv: &[&str]) -> Response {
        call(conn, Request::Exec(exec_req(id, argv)))
    }

    /// [`Self::exec`] with a stdin pipe the host may attach.
    fn exec_with_stdin(&self, conn: &mut UnixStream, id: &str, argv: &[&str]) -> Response {
        call(conn, Request::Exec(ExecRequest { stdin: true, ..exec_req(id, argv) }))
    }
}

impl Drop for Agent {
    /// Ask for a shutdown first, so the agent kills the processes it started.
    fn drop(&mut self) {
        if let Ok(mut conn) = UnixStream::connect(self.dir.path().join("rpc.sock")) {
            let _ = send(&mut conn, &Request::Shutdown);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exec_req(id: &str, argv: &[&str]) -> ExecRequest {
    ExecRequest { id: id.into(), argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn call(conn: &mut UnixStream, req: Request) -> Response {
    send(conn, &req).unwrap();
    recv(conn).unwrap()
}

fn wait(conn: &mut UnixStream, id: &str) -> Response {
    call(conn, Request::Wait { id: id.into() })
}

fn signal(conn: &mut UnixStream, id: &str, signal: i32) -> Response {
    call(conn, Request::Signal { id: id.into(), signal })
}

fn error_message(resp: Response) -> String {
    error_with_code(resp).0
}

fn error_with_code(resp: Response) -> (String, ErrorCode) {
    match resp {
        Response::Error { message, code } => (message, code),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn started(resp: Response) -> i32 {
    match resp {
        Response::Started { pid } => pid,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[test]
fn health_reports_the_protocol_version() {
    let agent = Agent::start();
    let resp = call(&mut agent.rpc(), Request::Health);
    assert_eq!(
        resp,
        Response::Health { protocol_version: PROTOCOL_VERSION, agent_version: env!("CARGO_PKG_VERSION").into() }
    );
}

#[test]
fn echo_output_arrives_on_the_stdout_stream() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "echo", &["echo", "hello", "world"]));
    assert_eq!(agent.read_stream("echo", StreamKind::Stdout), b"hello world\n");
    assert_eq!(wait(&mut rpc, "echo"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn exit_code_is_reported() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "three", &["sh", "-c", "exit 3"]));
    assert_eq!(wait(&mut rpc, "three"), Response::Exited(ExitStatus::Code(3)));
}

#[test]
fn killed_process_reports_the_signal() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "sleeper", &["sleep", "100"]));
    assert_eq!(signal(&mut rpc, "sleeper", 9), Response::Ok);
    assert_eq!(wait(&mut rpc, "sleeper"), Response::Exited(ExitStatus::Signal(9)));
    let (msg, code) = error_with_code(signal(&mut rpc, "sleeper", 15));
    assert!(msg.contains("exited"), "{msg}");
    assert_eq!(code, ErrorCode::NotFound);
    let (msg, code) = error_with_code(signal(&mut rpc, "nobody", 15));
    assert!(msg.contains("no process"), "{msg}");
    assert_eq!(code, ErrorCode::NotFound);

    // Real-time signals too (their default action also terminates).
    started(agent.exec(&mut rpc, "rt", &["sleep", "100"]));
    let (msg, code) = error_with_code(signal(&mut rpc, "rt", 1000));
    assert!(msg.contains("not a valid signal"), "{msg}");
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert_eq!(signal(&mut rpc, "rt", 40), Response::Ok);
    assert_eq!(wait(&mut rpc, "rt"), Response::Exited(ExitStatus::Signal(40)));
}

#[test]
fn ten_mib_round_trip_through_cat_is_byte_exact() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec_with_stdin(&mut rpc, "cat", &["cat"]));

    let mut stdout = agent.stream("cat", StreamKind::Stdout);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).unwrap();
        out
    });
    let data = pseudo_random(10 << 20);
    let mut stdin = agent.stream("cat", StreamKind::Stdin);
    stdin.write_all(&data).unwrap();
    stdin.shutdown(Shutdown::Write).unwrap();

    let out = reader.join().unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "cat output differs from its input");
    assert_eq!(wait(&mut rpc, "cat"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn host_dropping_a_stream_only_ends_that_stream() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "yes", &["yes", "tern"]));
    let mut stdout = agent.stream("yes", StreamKind::Stdout);
    let mut buf = vec![0u8; 1 << 20];
    stdout.read_exact(&mut buf).unwrap();
    assert!(buf.starts_with(b"tern\ntern\n"));
    drop(stdout);
    // The agent's copy fails, it closes the pipe, and `yes` dies of SIGPIPE like in a shell.
    assert_eq!(wait(&mut rpc, "yes"), Response::Exited(ExitStatus::Signal(13)));

    started(agent.exec_with_stdin(&mut rpc, "cat", &["cat"]));
    let mut stdin = agent.stream("cat", StreamKind::Stdin);
    stdin.write_all(b"half a line").unwrap();
    drop(stdin); // no half-close: the connection just goes away
    assert_eq!(agent.read_stream("cat", StreamKind::Stdout), b"half a line");
    assert_eq!(wait(&mut rpc, "cat"), Response::Exited(ExitStatus::Code(0)));
    assert!(matches!(call(&mut rpc, Request::Health), Response::Health { .. }));
}

#[test]
fn stderr_is_a_separate_stream() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "both", &["sh", "-c", "echo out; echo err >&2; exit 1"]));
    assert_eq!(agent.read_stream("both", StreamKind::Stderr), b"err\n");
    assert_eq!(agent.read_stream("both", StreamKind::Stdout), b"out\n");
    assert_eq!(wait(&mut rpc, "both"), Response::Exited(ExitStatus::Code(1)));
}

#[test]
fn output_written_before_the_stream_attaches_is_kept() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "early", &["sh", "-c", "echo early"]));
    assert_eq!(wait(&mut rpc, "early"), Response::Exited(ExitStatus::Code(0)));
    assert_eq!(agent.read_stream("early", StreamKind::Stdout), b"early\n");
}

#[test]
fn a_stream_attaches_only_once() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "once", &["sh", "-c", "sleep 1; echo once"]));
    // The first attach takes the stream; a second one is answered FailedPrecondition (never
    // mistaken for an empty stream) and carries no byte; the first gets all the output.
    let mut first = agent.stream("once", StreamKind::Stdout);
    let (mut second, answer) = agent.try_stream("once", StreamKind::Stdout);
    let (message, code) = error_with_code(answer);
    assert_eq!(code, ErrorCode::FailedPrecondition, "{message}");
    // A stdin stream for a running process without stdin is refused the same way; a stream
    // of a process the agent does not know is NotFound.
    let (_, answer) = agent.try_stream("once", StreamKind::Stdin);
    assert_eq!(error_with_code(answer).1, ErrorCode::FailedPrecondition);
    let (_, answer) = agent.try_stream("nope", StreamKind::Stderr);
    let (message, code) = error_with_code(answer);
    assert_eq!(code, ErrorCode::NotFound, "{message}");
    assert!(message.contains("nope"), "{message}");
    let mut rest = Vec::new();
    second.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "a refused stream carried bytes: {rest:?}");
    let mut output = Vec::new();
    first.read_to_end(&mut output).unwrap();
    assert_eq!(output, b"once\n");
    assert_eq!(wait(&mut rpc, "once"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn stdin_of_a_process_that_already_exited_is_accepted_and_closed() {
    // `tern run -- echo x` often ends before the host attaches its stdin: no error for that.
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec_with_stdin(&mut rpc, "quick", &["true"]));
    assert_eq!(wait(&mut rpc, "quick"), Response::Exited(ExitStatus::Code(0)));
    let mut stdin = agent.stream("quick", StreamKind::Stdin);
    let mut rest = Vec::new();
    stdin.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(agent.read_stream("quick", StreamKind::Stdout), b"");
}

#[test]
fn close_stdin_delivers_eof() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec_with_stdin(&mut rpc, "cat", &["cat"]));
    assert_eq!(call(&mut rpc, Request::CloseStdin { id: "cat".into() }), Response::Ok);
    assert_eq!(wait(&mut rpc, "cat"), Response::Exited(ExitStatus::Code(0)));

    // Also while a stdin stream is attached and the host never half-closes it.
    started(agent.exec_with_stdin(&mut rpc, "cat2", &["cat"]));
    let mut stdin = agent.stream("cat2", StreamKind::Stdin);
    stdin.write_all(b"partial").unwrap();
    let mut stdout = agent.stream("cat2", StreamKind::Stdout);
    let mut got = [0u8; 7];
    stdout.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"partial");
    assert_eq!(call(&mut rpc, Request::CloseStdin { id: "cat2".into() }), Response::Ok);
    assert_eq!(wait(&mut rpc, "cat2"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn env_cwd_and_default_path() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    let mut req = exec_req("env", &["sh", "-c", "echo \"$FOO|$PATH|$HOME\"; pwd"]);
    req.env = vec!["FOO=bar=baz".into()];
    req.cwd = Some("/tmp".into());
    started(call(&mut rpc, Request::Exec(req)));
    let out = String::from_utf8(agent.read_stream("env", StreamKind::Stdout)).unwrap();
    assert_eq!(out, "bar=baz|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|\n/tmp\n");
    assert_eq!(wait(&mut rpc, "env"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn stats_are_sane() {
    let agent = Agent::start();
    let Response::Stats(s) = call(&mut agent.rpc(), Request::Stats) else {
        panic!("expected stats");
    };
    assert!(s.mem_total_kib > 0 && s.mem_available_kib <= s.mem_total_kib, "{s:?}");
    assert!(s.mem_free_kib <= s.mem_total_kib, "{s:?}");
    assert!(s.cpus >= 1, "{s:?}");
    assert_eq!(s.cpu_ticks.len(), 8, "{s:?}");
    assert!(s.tasks >= 2, "{s:?}"); // at least the test and the agent
    assert!(s.uptime_secs > 0.0, "{s:?}");
    assert!(s.load_avg.iter().all(|l| *l >= 0.0), "{s:?}");
}

#[test]
fn malformed_frames_fail_only_that_request() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    frame::write_frame(&mut rpc, b"{not json").unwrap();
    let msg = error_message(recv(&mut rpc).unwrap());
    assert!(msg.starts_with("malformed request"), "{msg}");
    frame::write_frame(&mut rpc, br#"{"op":"frobnicate"}"#).unwrap();
    error_message(recv(&mut rpc).unwrap());
    assert!(matches!(call(&mut rpc, Request::Health), Response::Health { .. }));
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    rpc.write_all(&u32::MAX.to_be_bytes()).unwrap();
    error_message(recv(&mut rpc).unwrap());
    let mut rest = Vec::new();
    rpc.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(matches!(call(&mut agent.rpc(), Request::Health), Response::Health { .. }));
}

#[test]
fn bad_execs_are_errors() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    // A live child keeps the reaper blocked in waitid(), where it would race std's own reaping
    // of a child whose exec failed and abort the agent (see process.rs); try many times.
    started(agent.exec(&mut rpc, "bystander", &["sleep", "100"]));
    for i in 0..200 {
        let msg = error_message(agent.exec(&mut rpc, &format!("missing{i}"), &["no-such-binary-tern"]));
        assert_eq!(msg, "exec \"no-such-binary-tern\": No such file or directory");
    }
    let msg = error_message(agent.exec(&mut rpc, "abs", &["/nonexistent/bin/foo"]));
    assert_eq!(msg, "exec \"/nonexistent/bin/foo\": No such file or directory");
    let msg = error_message(agent.exec(&mut rpc, "empty", &[]));
    assert!(msg.contains("argv"), "{msg}");
    let mut req = exec_req("cwd", &["true"]);
    req.cwd = Some("/nonexistent".into());
    let msg = error_message(call(&mut rpc, Request::Exec(req)));
    assert_eq!(msg, "cwd \"/nonexistent\": No such file or directory");

    started(agent.exec(&mut rpc, "dup", &["sleep", "100"]));
    let (msg, code) = error_with_code(agent.exec(&mut rpc, "dup", &["true"]));
    assert!(msg.contains("already in use"), "{msg}");
    assert_eq!(code, ErrorCode::AlreadyExists);
    signal(&mut rpc, "dup", 9);
    // The failed ids are free again, and the agent is still serving.
    started(agent.exec(&mut rpc, "missing0", &["true"]));
    assert_eq!(wait(&mut rpc, "missing0"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn wait_blocks_only_its_own_connection() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    started(agent.exec(&mut rpc, "long", &["sleep", "100"]));
    let mut waiter = agent.rpc();
    let handle = std::thread::spawn(move || wait(&mut waiter, "long"));
    // A second concurrent Wait on the same process gets the status too.
    let mut waiter2 = agent.rpc();
    let handle2 = std::thread::spawn(move || wait(&mut waiter2, "long"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(call(&mut rpc, Request::Health), Response::Health { .. }));
    assert_eq!(signal(&mut rpc, "long", 15), Response::Ok);
    assert_eq!(handle.join().unwrap(), Response::Exited(ExitStatus::Signal(15)));
    assert_eq!(handle2.join().unwrap(), Response::Exited(ExitStatus::Signal(15)));
}

#[test]
fn orphans_are_reaped_and_do_not_confuse_the_table() {
    let agent = Agent::start();
    let mut rpc = agent.rpc();
    // The background sleep is re-parented to the agent (a subreaper off PID 1).
    started(agent.exec(&mut rpc, "parent", &["sh", "-c", "sleep 0.2 >/dev/null & exit 4"]));
    assert_eq!(wait(&mut rpc, "parent"), Response::Exited(ExitStatus::Code(4)));
    std::thread::sleep(Duration::from_millis(400));
    started(agent.exec(&mut rpc, "after", &["true"]));
    assert_eq!(wait(&mut rpc, "after"), Response::Exited(ExitStatus::Code(0)));
}

#[test]
fn shutdown_kills_processes_and_exits() {
    let mut agent = Agent::start();
    let mut rpc = agent.rpc();
    // Ignores SIGTERM, so it takes the SIGKILL after the grace period.
    started(agent.exec(&mut rpc, "stubborn", &["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"]));
    let pid = started(agent.exec(&mut rpc, "polite", &["sleep", "100"]));
    let t0 = Instant::now();
    assert_eq!(call(&mut rpc, Request::Shutdown), Response::Ok);
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert!(!std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || is_zombie_or_gone(pid));
}

fn is_zombie_or_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Deterministic incompressible-looking bytes (xorshift64).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
