#!/usr/bin/env python3
"""Run one KVM test binary (inside the nested runner, or directly on a KVM host).

Usage: run-test-binary.py PROGRESS_FILE BINARY [TEST ARGS...]

The binary runs with `--test-threads=1` and the given arguments; its output passes through
unchanged. The outcome is appended to PROGRESS_FILE as "BINARY ok" or "BINARY failed".

Inside the nested runner (TERN_RUNNER_INSIDE=1) two failures are not taken at face value,
both of a guest that never got far enough to run tern's code (README, "Tests"):
- a guest that triple-faulted. tern boots guests with `reboot=k panic=-1`, so a guest's own
  panic or reboot is an i8042 reset; a KVM_EXIT_SHUTDOWN (logged by the VMM as
  `exit_reason=8`) is a crash the guest could not even report, and under the runner's
  emulated SVM that happens now and then;
- a guest that never got going: its agent never answered at boot (tern's error says
  `the agent never became ready (guest: N vCPU exits, …)`). In the runner this comes with
  the emulated SVM's other failures: a guest stuck before its vsock driver started, or one
  of four guests booting at once with 261 vCPU exits after 60 s, a tenth of a normal boot. A guest whose agent is missing or broken fails the same way twice,
  and the rerun shows it.
When every failed test's report shows one of these, those tests run once more (`--exact`),
loudly; a second failure of any kind fails the binary, and every rerun is
recorded in PROGRESS_FILE as "BINARY retried NAME… (why): passed|failed again". Any other
failure fails at once: a hang that looked like the emulation (fs-serve's guest stuck before
its first line) was a lost-kick bug in vhost-user-backend 0.21. On a host whose KVM boots
Linux directly nothing is rerun. TERN_KVM_RETRY=0 turns reruns off, =1 forces them on.
"""

import os
import re
import subprocess
import sys

TRIPLE_FAULT = "exit_reason=8"
BOOT_FAILURE = re.compile(r"the agent never became ready \(guest: \d+ vCPU exits, ")


def emulation_failure(report):
    """Why a failed test's report looks like the emulated SVM's fault, or None."""
    if TRIPLE_FAULT in report:
        return f"guest triple fault, {TRIPLE_FAULT}"
    if BOOT_FAILURE.search(report):
        return "guest agent never answered at boot"
    return None


def run(binary, args):
    """Run the binary, echoing its stdout as it comes, and return (status, stdout text)."""
    proc = subprocess.Popen([binary, "--test-threads=1", *args], stdout=subprocess.PIPE)
    out = bytearray()
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        out += chunk
    return proc.wait(), out.decode("utf-8", "replace")


def failure_reports(stdout):
    """Each failed test's captured output, by name, from libtest's `---- NAME stdout ----` blocks."""
    failed = re.findall(r"^test (\S+) \.\.\. FAILED$", stdout, re.M)
    reports = {}
    parts = re.split(r"^---- (\S+) stdout ----$", stdout, flags=re.M)
    for name, text in zip(parts[1::2], parts[2::2]):
        reports[name] = text
    return {name: reports.get(name, "") for name in failed}


def retry_enabled():
    setting = os.environ.get("TERN_KVM_RETRY", "")
    if setting in ("0", "1"):
        return setting == "1"
    return os.environ.get("TERN_RUNNER_INSIDE") == "1"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    progress, binary, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    status, stdout = run(binary, args)
    reports = failure_reports(stdout) if status != 0 else {}
    whys = {emulation_failure(text) for text in reports.values()}
    if reports and retry_enabled() and None not in whys:
        names = sorted(reports)
        why = "; ".join(sorted(whys))
        print(f">> RETRY {os.path.basename(binary)}: {' '.join(names)} failed ({why}); once more", flush=True)
        flags = [a for a in args if a.startswith("-")]  # e.g. --include-ignored; not filters
        status, _ = run(binary, [*flags, "--exact", *names])
        with open(progress, "a") as f:
            f.write(f"{binary} retried {' '.join(names)} ({why}): {'passed' if status == 0 else 'failed again'}\n")
    with open(progress, "a") as f:
        f.write(f"{binary} {'ok' if status == 0 else 'failed'}\n")
    return 1 if status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
