#!/usr/bin/env python3
"""Run one KVM test binary (inside the nested runner, or directly on a KVM host).

Usage: run-test-binary.py PROGRESS_FILE BINARY [TEST ARGS...]

The binary runs with `--test-threads=1` and the given arguments; its output passes through
unchanged. The outcome is appended to PROGRESS_FILE as "BINARY ok" or "BINARY failed".

Inside the nested runner (TERN_RUNNER_INSIDE=1) a failed test runs once more (`--exact`),
loudly: every guest there runs under an outer VM whose SVM is emulated by QEMU TCG, and that
emulation fails on its own now and then — the outer kernel crashed once (a stack-guard oops
in a vCPU thread), guests triple-faulted (KVM_EXIT_SHUTDOWN, logged by the VMM as
`exit_reason=8`, although tern boots guests with `reboot=k panic=-1`, so a guest's own panic
or reboot is an i8042 reset), and a QEMU guest stalled before its first output. A test that
fails twice fails the binary; every rerun is recorded in PROGRESS_FILE as
"BINARY retried NAME… (why)" and summed up at the end of the run. On a host whose KVM boots
Linux directly nothing is rerun. TERN_KVM_RETRY=0 turns reruns off, =1 forces them on.
"""

import os
import re
import subprocess
import sys

TRIPLE_FAULT = "exit_reason=8"


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
    if reports and retry_enabled():
        names = sorted(reports)
        why = ", ".join(
            f"{n}: {'guest triple fault' if TRIPLE_FAULT in reports[n] else 'failed'}" for n in names
        )
        print(
            f">> RETRY {os.path.basename(binary)} under the emulated runner, once ({why})",
            flush=True,
        )
        flags = [a for a in args if a.startswith("-")]  # e.g. --include-ignored; not filters
        status, _ = run(binary, [*flags, "--exact", *names])
        with open(progress, "a") as f:
            f.write(f"{binary} retried ({why}): {'passed' if status == 0 else 'failed again'}\n")
    with open(progress, "a") as f:
        f.write(f"{binary} {'ok' if status == 0 else 'failed'}\n")
    return 1 if status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
