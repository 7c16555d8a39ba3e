#!/usr/bin/env python3
"""tern boot benchmark: tern vs QEMU `-M microvm`, same guest kernel and initramfs, one machine.

Measures, N runs per system (medians, p90, min, max):

1. boot -> agent ready: wall time from spawning the VMM to the moment the guest agent's
   `TERN-AGENT-READY` line shows up on the VMM's stdout (serial console).
   tern: `tern run --console-log stdout --timings -- true`; also the `tern timings:` line from
   stderr and the wall time to process exit (`tern run -- true` end to end).
   QEMU: `qemu-system-x86_64 -M microvm,acpi=off -accel kvm ... -kernel K -initrd I`; killed
   once the marker is seen.
2. host-side VMM overhead: Rss of the VMM process minus the Rss of its guest-memory mapping
   (read from /proc/<pid>/smaps while the guest runs `sleep 3` / sits idle after the marker).

Writes results/boot.md (also printed), results/boot.svg and results/boot.json.
A run that fails or times out is recorded and reported as a failure; the exit status is 1
if every run of a measured system failed, 2 on usage errors, 0 otherwise.
Meant to run inside tests/nested-runner (see tests/bench/run.sh): compare ratios, not
absolute times, and only within one run.

Python 3.11, standard library only.  `--selftest` checks the parsing / statistics /
table / SVG logic and the process machinery with fake VMMs (no KVM needed).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import hashlib
import html
import json
import math
import os
import platform
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
MARKER = b"TERN-AGENT-READY"
MiB = 1 << 20
TARGET_BOOT_RATIO = 0.5  # tern boot->ready <= 0.5x QEMU
TARGET_OVERHEAD_MIB = 5.0  # tern VMM overhead <= 5 MiB
TAIL_CHARS = 4000  # how much of a failed run's output goes into boot.json

# tern-unfiltered: tern with `[vmm] seccomp = "off"`, to price the VMM threads' filters.
SYSTEMS = ("tern", "qemu", "tern-unfiltered")
LABEL = {"tern": "tern", "qemu": "QEMU microvm", "tern-unfiltered": "tern, VMM seccomp off"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- statistics


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        raise ValueError("empty")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: list[float | None]) -> dict[str, Any] | None:
    vals = [float(x) for x in xs if x is not None]
    if not vals:
        return None
    return {
        "n": len(vals),
        "median": quantile(vals, 0.5),
        "p90": quantile(vals, 0.9),
        "min": min(vals),
        "max": max(vals),
    }


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


# ----------------------------------------------------------------------------- parsing

TIMINGS_RE = re.compile(r"tern timings:(.*)")
TIMING_KV_RE = re.compile(r"(\w+)=(n/a|[0-9]+(?:\.[0-9]+)?)(?:ms)?")


def parse_tern_timings(stderr_text: str) -> dict[str, float | None] | None:
    """`tern timings: vmm_start=0ms kernel_entry=Xms agent_ready=Yms ...` -> {name: ms or None}.
    The last such line wins; None if there is none."""
    found = None
    for line in stderr_text.splitlines():
        m = TIMINGS_RE.search(line)
        if not m:
            continue
        d: dict[str, float | None] = {}
        for k, v in TIMING_KV_RE.findall(m.group(1)):
            d[k] = None if v == "n/a" else float(v)
        found = d
    return found


SMAPS_HDR_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+(\S+)\s+(\d+)\s*(.*)$"
)


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    path: str
    kb: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def rss(self) -> int:
        return self.kb.get("Rss", 0) * 1024

    @property
    def private(self) -> int:
        return (self.kb.get("Private_Clean", 0) + self.kb.get("Private_Dirty", 0)) * 1024

    @property
    def anonymous(self) -> bool:
        p = self.path
        return (
            p == ""
            or p.startswith("[anon")
            or p.startswith("/memfd:")
            or p.startswith("/dev/zero")
            or p.startswith("/anon_hugepage")
            or p.startswith("/SYSV")
        )

    def describe(self) -> dict[str, Any]:
        return {
            "range": f"{self.start:x}-{self.end:x}",
            "perms": self.perms,
            "path": self.path,
            "size_mib": self.size / MiB,
            "rss_mib": self.rss / MiB,
        }


def parse_smaps(text: str) -> list[Vma]:
    vmas: list[Vma] = []
    for line in text.splitlines():
        m = SMAPS_HDR_RE.match(line)
        if m:
            vmas.append(
                Vma(int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(7).strip())
            )
            continue
        if not vmas or ":" not in line:
            continue
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            vmas[-1].kb[key.strip()] = int(parts[0])
    return vmas


def find_guest_memory(vmas: list[Vma], guest_bytes: int) -> list[Vma]:
    """The mapping(s) backing guest RAM: an anonymous rw mapping of exactly the guest size;
    else two that add up to it (RAM split at the 32-bit gap); else one at most 4 MiB larger
    (a VMM that maps alignment slack together with RAM). [] if nothing fits."""
    cand = [v for v in vmas if v.anonymous and v.perms.startswith("rw")]
    exact = [v for v in cand if v.size == guest_bytes]
    if exact:
        return [max(exact, key=lambda v: v.rss)]
    big = sorted((v for v in cand if v.size >= MiB), key=lambda v: -v.size)
    for i, a in enumerate(big):
        for b in big[i + 1 :]:
            if a.size + b.size == guest_bytes:
                return [a, b]
    near = [v for v in cand if guest_bytes < v.size <= guest_bytes + 4 * MiB]
    if near:
        return [min(near, key=lambda v: v.size)]
    return []


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


def measure_memory(pid: int, guest_bytes: int) -> dict[str, Any]:
    """VMM overhead of the process tree rooted at pid: total Rss minus the guest-RAM Rss."""
    total_rss = total_priv = guest_rss = guest_priv = 0
    procs, guest_maps = [], []
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps") as f:
                vmas = parse_smaps(f.read())
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # exited meanwhile
        g = find_guest_memory(vmas, guest_bytes)
        rss = sum(v.rss for v in vmas)
        priv = sum(v.private for v in vmas)
        total_rss += rss
        total_priv += priv
        guest_rss += sum(v.rss for v in g)
        guest_priv += sum(v.private for v in g)
        guest_maps += [dict(v.describe(), pid=p) for v in g]
        procs.append({"pid": p, "comm": comm, "rss_mib": rss / MiB, "vmas": len(vmas)})
    if not procs:
        return {"ok": False, "error": "process gone before smaps could be read"}
    res: dict[str, Any] = {
        "procs": procs,
        "total_rss_mib": total_rss / MiB,
        "guest_rss_mib": guest_rss / MiB,
        "guest_maps": guest_maps,
    }
    if not guest_maps:
        res.update(ok=False, error=f"no guest-memory mapping of {guest_bytes // MiB} MiB found")
        return res
    res.update(
        ok=True,
        overhead_rss_mib=(total_rss - guest_rss) / MiB,
        overhead_private_mib=(total_priv - guest_priv) / MiB,
    )
    return res


# ----------------------------------------------------------------------------- running a VMM


@dataclass
class RunResult:
    ok: bool = False
    error: str | None = None
    ready_ms: float | None = None  # spawn -> marker line on stdout
    exit_ms: float | None = None  # spawn -> process exit (None if we killed it)
    returncode: int | None = None
    timed_out: bool = False
    killed_by_bench: bool = False
    mem: dict[str, Any] | None = None
    timings: dict[str, float | None] | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if self.ok:  # keep boot.json small: output tails only for failures
            d.pop("stdout_tail")
            d.pop("stderr_tail")
        return d


ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        p.kill()


def watch(
    cmd: list[str],
    timeout: float,
    kill_after_marker: bool,
    sample_after: float | None = None,
    sampler: Callable[[int], dict[str, Any]] | None = None,
) -> RunResult:
    """Spawn cmd, timestamp the marker on stdout, optionally sample the process `sample_after`
    seconds after the marker, optionally kill it after the marker (and sample), else wait
    for it to exit. Everything under one per-run deadline."""
    r = RunResult()
    out = bytearray()
    err = bytearray()
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=REPO,
        )
    except OSError as e:
        r.error = f"cannot spawn {cmd[0]}: {e}"
        return r
    deadline = t0 + timeout
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, out)
    sel.register(p.stderr, selectors.EVENT_READ, err)
    open_fds = 2
    marker_at: float | None = None
    scan_from = 0
    sample_at: float | None = None
    sampled = sampler is None
    try:
        while True:
            now = time.monotonic()
            if sample_at is not None and not sampled and now >= sample_at:
                if p.poll() is None:
                    r.mem = sampler(p.pid)
                else:
                    r.mem = {"ok": False, "error": "VMM exited before the memory sample"}
                sampled = True
            if marker_at is not None and kill_after_marker and sampled:
                kill_group(p)
                r.killed_by_bench = True
                break
            if open_fds == 0:
                break
            if now >= deadline:
                r.timed_out = True
                break
            wake = deadline
            if sample_at is not None and not sampled:
                wake = min(wake, sample_at)
            for key, _ in sel.select(max(0.0, wake - now)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_fds -= 1
                    continue
                key.data.extend(chunk)
                if key.data is out and marker_at is None:
                    if out.find(MARKER, max(0, scan_from - len(MARKER))) >= 0:
                        marker_at = time.monotonic()
                        r.ready_ms = (marker_at - t0) * 1000
                        if sampler is not None:
                            sample_at = marker_at + (sample_after or 0.0)
                    scan_from = len(out)
        # pipes closed (or killed / timed out): reap within what is left of the deadline
        if not r.killed_by_bench and not r.timed_out:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
                r.exit_ms = (time.monotonic() - t0) * 1000
            except subprocess.TimeoutExpired:
                r.timed_out = True
    finally:
        if p.poll() is None:
            kill_group(p)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        r.returncode = p.returncode
        sel.close()
        p.stdout.close()
        p.stderr.close()
    r.stdout_tail = ANSI_RE.sub("", out[-TAIL_CHARS:].decode(errors="replace"))
    r.stderr_tail = ANSI_RE.sub("", err[-TAIL_CHARS:].decode(errors="replace"))
    r.timings = parse_tern_timings(ANSI_RE.sub("", err.decode(errors="replace")))
    # verdict
    if r.timed_out:
        r.error = f"timed out after {timeout:g} s" + ("" if marker_at else " without the marker")
    elif marker_at is None:
        r.error = f"no {MARKER.decode()} on stdout (exit status {r.returncode})"
    elif not r.killed_by_bench and r.returncode != 0:
        r.error = f"exit status {r.returncode}"
    elif sampler is not None and not (r.mem or {}).get("ok"):
        r.error = "memory sample: " + (r.mem or {}).get(
            "error", "VMM exited before the memory sample"
        )
    else:
        r.ok = True
    return r


# ----------------------------------------------------------------------------- the systems


@dataclass
class Setup:
    tern: Path
    qemu: str
    kernel: Path
    initrd: Path
    memory_mib: int
    qemu_vsock: bool
    timeout: float
    settle: float
    vsock_cid: int = 3
    # a config with `[vmm] seccomp = "off"`, for tern-unfiltered
    unfiltered_config: Path | None = None

    def tern_cmd(self, argv: list[str], unfiltered: bool = False) -> list[str]:
        config = ["--config", str(self.unfiltered_config)] if unfiltered and self.unfiltered_config else []
        return [
            str(self.tern), *config, "run", "--console-log", "stdout", "--timings",
            "--memory", str(self.memory_mib),
            "--kernel", str(self.kernel), "--initrd", str(self.initrd),
            "--", *argv,
        ]  # fmt: skip

    def qemu_cmd(self) -> list[str]:
        cmd = [
            self.qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host",
            "-smp", "1", "-m", str(self.memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", "console=ttyS0 quiet reboot=k panic=-1 8250.nr_uarts=1",
        ]  # fmt: skip
        if self.qemu_vsock:
            # a fresh CID per boot: a VM still being torn down may hold the previous one
            self.vsock_cid = 3 + (self.vsock_cid - 2) % 100000
            cmd += ["-device", f"vhost-vsock-device,guest-cid={self.vsock_cid}"]
        return cmd

    def boot(self, system: str) -> RunResult:
        if system.startswith("tern"):
            cmd = self.tern_cmd(["true"], unfiltered=system == "tern-unfiltered")
            return watch(cmd, self.timeout, kill_after_marker=False)
        return watch(self.qemu_cmd(), self.timeout, kill_after_marker=True)

    def memory(self, system: str) -> RunResult:
        gb = self.memory_mib * MiB
        sampler = lambda pid: measure_memory(pid, gb)  # noqa: E731
        if system.startswith("tern"):
            return watch(
                self.tern_cmd(["sleep", "3"], unfiltered=system == "tern-unfiltered"), self.timeout,
                kill_after_marker=False,
                sample_after=self.settle, sampler=sampler,
            )  # fmt: skip
        return watch(
            self.qemu_cmd(), self.timeout, kill_after_marker=True,
            sample_after=self.settle, sampler=sampler,
        )  # fmt: skip


def run_all(
    setup: Any, systems: list[str], runs: int, warmup: int, mem_samples: int
) -> dict[str, dict[str, list[RunResult]]]:
    res: dict[str, dict[str, list[RunResult]]] = {
        s: {"warmup": [], "boot": [], "mem": []} for s in systems
    }

    def one(kind: str, system: str, i: int, n: int) -> None:
        r = setup.boot(system) if kind in ("warmup", "boot") else setup.memory(system)
        res[system][kind].append(r)
        what = f"{LABEL[system]} {kind} {i + 1}/{n}"
        if not r.ok:
            log(f"{what}: FAILED: {r.error}")
            tail = (r.stderr_tail.strip() or r.stdout_tail.strip()).splitlines()[-3:]
            for line in tail:
                log(f"    | {line}")
        elif kind == "mem":
            m = r.mem or {}
            log(
                f"{what}: overhead {m['overhead_rss_mib']:.1f} MiB "
                f"(total {m['total_rss_mib']:.1f}, guest {m['guest_rss_mib']:.1f})"
            )
        else:
            extra = f", exit {r.exit_ms:.0f} ms" if r.exit_ms is not None else ""
            log(f"{what}: ready {r.ready_ms:.0f} ms{extra}")

    # interleave the systems and alternate their order, so drift hits both alike
    for kind, n in (("warmup", warmup), ("boot", runs), ("mem", mem_samples)):
        for i in range(n):
            order = systems if i % 2 == 0 else list(reversed(systems))
            for s in order:
                one(kind, s, i, n)
    return res


# ----------------------------------------------------------------------------- host facts


def _cmd_out(cmd: list[str]) -> str | None:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    s = (cp.stdout or cp.stderr).strip()
    return s.splitlines()[0] if s else None


def file_facts(path: Path, origin: Path | None = None) -> dict[str, Any]:
    """path: what the VMMs are given; origin: where it was copied from (reported as 'path')."""
    src = origin or path
    d: dict[str, Any] = {"path": str(src)}
    if origin is not None:
        d["used_copy"] = str(path)
    try:
        d["resolved"] = str(src.resolve(strict=True))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        d["sha256"] = h.hexdigest()
        d["size_bytes"] = path.stat().st_size
    except OSError as e:
        d["error"] = str(e)
    return d


def snapshot(paths: dict[str, Path], into: Path) -> dict[str, Path]:
    """Copy the inputs into a private dir: both systems boot the very same bytes, a concurrent
    `make build` cannot swap or delete them mid-run, and inside the nested runner every boot
    reads them from tmpfs instead of 9p."""
    import shutil

    out = {}
    for name, src in paths.items():
        dst = into / f"{name}-{src.name}"
        shutil.copyfile(src.resolve(strict=True), dst)
        shutil.copymode(src.resolve(strict=True), dst)
        out[name] = dst
    return out


def host_facts(setup: Setup, origin: dict[str, Path] | None = None) -> dict[str, Any]:
    def read(p: str) -> str | None:
        try:
            with open(p) as f:
                return f.read().strip()
        except OSError:
            return None

    kvm = [m for m in ("kvm_pvm", "kvm_amd", "kvm_intel") if os.path.exists(f"/sys/module/{m}")]
    nested_param = None
    for m in ("kvm_amd", "kvm_intel"):
        v = read(f"/sys/module/{m}/parameters/nested")
        if v is not None:
            nested_param = f"{m}.nested={v}"
    cpu = None
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_total = None
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) // 1024
    git = _cmd_out(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = _cmd_out(["git", "status", "--porcelain", "--untracked-files=no"])
    inside = os.environ.get("TERN_RUNNER_INSIDE") == "1"
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nested_runner": inside,
        "environment": (
            "inside tests/nested-runner (outer QEMU TCG VM, nested KVM): compare ratios only"
            if inside
            else "directly on this host's KVM"
        ),
        "kvm_modules": kvm,
        "kvm_nested_param": nested_param,
        "uname": platform.uname().release,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "mem_total_mib": mem_total,
        "dev_vhost_vsock": os.path.exists("/dev/vhost-vsock"),
        "qemu_version": _cmd_out([setup.qemu, "--version"]),
        "tern_version": _cmd_out([str(setup.tern), "--version"]),
        "git": (git + ("-dirty" if dirty else "")) if git else None,
        "kernel": file_facts(setup.kernel, (origin or {}).get("kernel")),
        "initrd": file_facts(setup.initrd, (origin or {}).get("initrd")),
        "snapshot": origin is not None,
        "guest_memory_mib": setup.memory_mib,
        "qemu_vsock": setup.qemu_vsock,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- report


def build_summary(res: dict[str, dict[str, list[RunResult]]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for system, kinds in res.items():
        boots, mems = kinds["boot"], kinds["mem"]
        ok_b = [r for r in boots if r.ok]
        ok_m = [r for r in mems if r.ok]
        d: dict[str, Any] = {
            "boot_runs": len(boots),
            "boot_failures": len(boots) - len(ok_b),
            "mem_samples": len(mems),
            "mem_failures": len(mems) - len(ok_m),
            "ready_ms": summarize([r.ready_ms for r in ok_b]),
            "overhead_rss_mib": summarize([r.mem["overhead_rss_mib"] for r in ok_m]),
            "overhead_private_mib": summarize([r.mem["overhead_private_mib"] for r in ok_m]),
            "total_rss_mib": summarize([r.mem["total_rss_mib"] for r in ok_m]),
            "guest_rss_mib": summarize([r.mem["guest_rss_mib"] for r in ok_m]),
        }
        if system.startswith("tern"):
            d["exit_ms"] = summarize([r.exit_ms for r in ok_b])
            for k in ("kernel_entry", "agent_ready", "command_exit", "vm_down"):
                d[f"timings_{k}_ms"] = summarize([(r.timings or {}).get(k) for r in ok_b])
        s[system] = d
    t, q, u = s.get("tern"), s.get("qemu"), s.get("tern-unfiltered")
    s["ratios"] = {
        # the VMM threads' seccomp filters: tern as shipped / tern with them off
        "seccomp_ready": ratio(t and t["ready_ms"], u and u["ready_ms"]),
        "seccomp_exit": ratio(t and t.get("exit_ms"), u and u.get("exit_ms")),
        "ready": ratio(t and t["ready_ms"], q and q["ready_ms"]),
        "overhead_rss": ratio(t and t["overhead_rss_mib"], q and q["overhead_rss_mib"]),
        "overhead_private": ratio(
            t and t["overhead_private_mib"], q and q["overhead_private_mib"]
        ),
    }
    return s


def fmt_num(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v:.1f}"


def fmt_cell(st: dict | None, unit: str, runs: int | None = None, fails: int = 0) -> str:
    if st is None:
        return f"— (all {runs} failed)" if runs and fails == runs else "—"
    core = f"**{fmt_num(st['median'], unit)} {unit}**"
    if st["n"] > 1:
        core += (
            f" (p90 {fmt_num(st['p90'], unit)}, "
            f"{fmt_num(st['min'], unit)}–{fmt_num(st['max'], unit)})"
        )
    return core


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def headlines(summary: dict[str, Any]) -> list[str]:
    t, q, rt = summary.get("tern"), summary.get("qemu"), summary["ratios"]
    lines = []
    tr = t and t["ready_ms"]
    qr = q and q["ready_ms"]
    r = rt["ready"]
    lines.append(
        "boot → agent ready: tern "
        + (f"{tr['median']:.0f} ms" if tr else "n/a")
        + " vs QEMU microvm "
        + (f"{qr['median']:.0f} ms" if qr else "n/a")
        + f" = {fmt_ratio(r)} (target ≤ {TARGET_BOOT_RATIO}×: "
        + verdict(None if r is None else r <= TARGET_BOOT_RATIO)
        + ")"
    )
    to = t and t["overhead_rss_mib"]
    qo = q and q["overhead_rss_mib"]
    lines.append(
        "VMM overhead (Rss − guest RAM): tern "
        + (f"{to['median']:.1f} MiB" if to else "n/a")
        + f" (target ≤ {TARGET_OVERHEAD_MIB:g} MiB: "
        + verdict(None if not to else to["median"] <= TARGET_OVERHEAD_MIB)
        + "); QEMU microvm "
        + (f"{qo['median']:.1f} MiB" if qo else "n/a")
        + f"; ratio {fmt_ratio(rt['overhead_rss'])}"
    )
    u = summary.get("tern-unfiltered")
    if t and u and t["ready_ms"] and u["ready_ms"]:
        lines.append(
            f"VMM seccomp filters: boot → agent ready {t['ready_ms']['median']:.0f} ms with them vs "
            f"{u['ready_ms']['median']:.0f} ms off = {fmt_ratio(rt['seccomp_ready'])}; "
            f"`tern run -- true` end to end {fmt_ratio(rt['seccomp_exit'])}"
        )
    return lines


def render_markdown(
    summary: dict[str, Any],
    facts: dict[str, Any],
    res: dict[str, dict[str, list[RunResult]]],
    config: dict[str, Any],
) -> str:
    t, q = summary.get("tern"), summary.get("qemu")
    rt = summary["ratios"]

    def cell(sd: dict | None, key: str, unit: str, runs_key: str, fails_key: str) -> str:
        if sd is None:
            return "not measured"
        return fmt_cell(sd.get(key), unit, sd[runs_key], sd[fails_key])

    rows: list[tuple[str, str, str, str]] = []
    rows.append((
        "boot → agent ready (spawn → `TERN-AGENT-READY` on the console)",
        cell(t, "ready_ms", "ms", "boot_runs", "boot_failures"),
        cell(q, "ready_ms", "ms", "boot_runs", "boot_failures"),
        fmt_ratio(rt["ready"]),
    ))  # fmt: skip
    if t is not None:
        rows.append((
            "`tern run -- true` end to end (spawn → exit)",
            cell(t, "exit_ms", "ms", "boot_runs", "boot_failures"), "—", "—",
        ))  # fmt: skip
        for k, label in (
            ("kernel_entry", "tern timings: kernel_entry"),
            ("agent_ready", "tern timings: agent_ready"),
            ("command_exit", "tern timings: command_exit"),
            ("vm_down", "tern timings: vm_down"),
        ):
            rows.append((label + " (from VMM start)", cell(t, f"timings_{k}_ms", "ms",
                         "boot_runs", "boot_failures"), "—", "—"))  # fmt: skip
    rows.append((
        "VMM overhead: Rss − guest-RAM Rss",
        cell(t, "overhead_rss_mib", "MiB", "mem_samples", "mem_failures"),
        cell(q, "overhead_rss_mib", "MiB", "mem_samples", "mem_failures"),
        fmt_ratio(rt["overhead_rss"]),
    ))  # fmt: skip
    rows.append((
        "VMM overhead, private only (excl. shared pages)",
        cell(t, "overhead_private_mib", "MiB", "mem_samples", "mem_failures"),
        cell(q, "overhead_private_mib", "MiB", "mem_samples", "mem_failures"),
        fmt_ratio(rt["overhead_private"]),
    ))  # fmt: skip
    rows.append((
        "guest RAM touched (Rss of the guest mapping)",
        cell(t, "guest_rss_mib", "MiB", "mem_samples", "mem_failures"),
        cell(q, "guest_rss_mib", "MiB", "mem_samples", "mem_failures"),
        "—",
    ))  # fmt: skip

    def fails(sd: dict | None, a: str, b: str) -> str:
        return "not measured" if sd is None else f"{sd[b]}/{sd[a]}"

    rows.append((
        "failed boot runs",
        fails(t, "boot_runs", "boot_failures"), fails(q, "boot_runs", "boot_failures"), "—",
    ))  # fmt: skip
    rows.append((
        "failed memory samples",
        fails(t, "mem_samples", "mem_failures"), fails(q, "mem_samples", "mem_failures"), "—",
    ))  # fmt: skip

    L: list[str] = []
    L.append("# tern boot benchmark: tern vs QEMU `-M microvm`")
    L.append("")
    L.append(
        f"{facts['date_utc']} · {facts['environment']} · "
        f"{config['runs']} boot runs + {config['warmup']} warm-up per system, "
        f"{config['mem_samples']} memory samples · medians, with (p90, min–max)"
    )
    L.append("")
    L.append("| metric | tern | QEMU microvm | ratio (tern/QEMU) |")
    L.append("|---|---|---|---|")
    for r in rows:
        L.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    L.append("")
    u = summary.get("tern-unfiltered")
    if u is not None:
        L.append("VMM seccomp filters (tern as shipped vs `[vmm] seccomp = \"off\"`, interleaved in this run):")
        L.append("")
        L.append("| metric | tern | tern, VMM seccomp off | ratio (filters on/off) |")
        L.append("|---|---|---|---|")
        for label, key, ratio_key in (
            ("boot → agent ready", "ready_ms", "seccomp_ready"),
            ("`tern run -- true` end to end", "exit_ms", "seccomp_exit"),
        ):
            L.append(f"| {label} | {cell(t, key, 'ms', 'boot_runs', 'boot_failures')} | "
                     f"{cell(u, key, 'ms', 'boot_runs', 'boot_failures')} | {fmt_ratio(rt[ratio_key])} |")  # fmt: skip
        L.append("")
    L.append("Targets: " + " · ".join(headlines(summary)))
    L.append("")
    fails_list = []
    for system, kinds in res.items():
        for kind in ("boot", "mem"):
            for i, r in enumerate(kinds[kind]):
                if not r.ok:
                    fails_list.append(f"- {LABEL[system]} {kind} run {i + 1}: {r.error}")
    if fails_list:
        L.append("## Failures")
        L.append("")
        L.extend(fails_list[:50])
        if len(fails_list) > 50:
            L.append(f"- … {len(fails_list) - 50} more (see boot.json)")
        L.append("")
    k, i = facts["kernel"], facts["initrd"]
    L.append("## Setup")
    L.append("")
    L.append(
        f"- where: {facts['environment']}; kvm modules: {', '.join(facts['kvm_modules']) or 'none'}"
        + (f" ({facts['kvm_nested_param']})" if facts.get("kvm_nested_param") else "")
    )
    L.append(
        f"- host: {facts['cpu']}, {facts['nproc']} CPUs, {facts['mem_total_mib']} MiB, "
        f"Linux {facts['uname']}"
    )
    L.append(
        f"- guest kernel: `{k['path']}` → `{k.get('resolved', '?')}` "
        f"(sha256 {k.get('sha256', '?')[:16]})"
    )
    L.append(
        f"- initramfs: `{i['path']}` (sha256 {i.get('sha256', '?')[:16]}, "
        f"{i.get('size_bytes', 0) / MiB:.1f} MiB)"
    )
    if facts.get("snapshot"):
        L.append(
            "- tern, kernel and initramfs were copied to a private tmp dir at the start "
            "(same bytes for both systems; commands below show the copies)"
        )
    L.append(
        f"- guest: 1 vCPU, {facts['guest_memory_mib']} MiB; QEMU vsock device: "
        + (
            "vhost-vsock-device"
            if facts["qemu_vsock"]
            else "none" + ("" if facts["dev_vhost_vsock"] else " (no /dev/vhost-vsock)")
        )
    )
    L.append(f"- tern: {facts.get('tern_version') or '?'}; git {facts.get('git') or '?'}")
    L.append(f"- QEMU: {facts.get('qemu_version') or '?'}")
    if "tern" in res:
        L.append(f"- tern command: `{config['tern_cmd']}`")
    if "qemu" in res:
        L.append(f"- QEMU command: `{config['qemu_cmd']}`")
    L.append(
        "- memory: `/proc/<pid>/smaps` of the VMM process (and any children), "
        f"{config['settle']:g} s after the marker; tern runs `sleep 3`, QEMU idles, then is killed"
    )
    L.append("")
    return "\n".join(L)


def render_svg(summary: dict[str, Any], facts: dict[str, Any]) -> str:
    """Hand-written SVG: one panel per comparable metric, a bar per system (median) with a
    min–max whisker, a p90 tick and the target as a dashed line."""
    W, left, right = 760, 130, 40
    bar_h, gap, panel_head, panel_gap = 26, 10, 46, 22
    colors = {"tern": "#2f6db5", "qemu": "#d0792a", "tern-unfiltered": "#7fa7d9"}
    t, q = summary.get("tern"), summary.get("qemu")
    systems_all = [s for s in SYSTEMS if summary.get(s) is not None]
    # (title, summary key, unit, target value, target label, systems shown)
    panels: list[tuple[str, str, str, float | None, str, list[str]]] = [
        ("boot → agent ready", "ready_ms", "ms",
         (q["ready_ms"]["median"] * TARGET_BOOT_RATIO if q and q["ready_ms"] else None),
         f"target: ≤ {TARGET_BOOT_RATIO}× QEMU", systems_all),
        ("VMM overhead (Rss − guest RAM)", "overhead_rss_mib", "MiB", TARGET_OVERHEAD_MIB,
         f"target: ≤ {TARGET_OVERHEAD_MIB:g} MiB", systems_all),
    ]  # fmt: skip
    if t is not None:
        panels.insert(1, ("tern run -- true, end to end", "exit_ms", "ms", None, "", ["tern"]))
    def panel_h(n: int) -> int:
        return panel_head + n * (bar_h + gap) + 8

    H = 58 + sum(panel_h(len(p[5])) + panel_gap for p in panels)
    e = html.escape
    o: list[str] = []
    o.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
        'font-size="12">'
    )
    o.append(f'<rect width="{W}" height="{H}" fill="#ffffff"/>')
    o.append(
        '<text x="16" y="24" font-size="16" font-weight="bold">'
        "tern vs QEMU microvm — same kernel and initramfs</text>"
    )
    o.append(
        f'<text x="16" y="42" fill="#555">{e(facts["date_utc"])} · '
        f'{"nested runner (ratios only)" if facts["nested_runner"] else "host KVM"} · '
        "bars: median · whisker: min–max · dot: p90</text>"
    )
    y = 58
    plot_w = W - left - right
    # panels with the same unit share one scale, so their bars compare
    unit_max: dict[str, float] = {}
    for _, key, unit, target, _, systems in panels:
        vals = [(summary[s] or {}).get(key) for s in systems]
        m = max([st["max"] for st in vals if st] + [target or 0])
        unit_max[unit] = max(unit_max.get(unit, 0.0), m)
    for title, key, unit, target, tlabel, systems in panels:
        stats = {s: (summary[s] or {}).get(key) for s in systems}
        vmax = unit_max[unit] or 1.0
        scale = plot_w / (vmax * 1.12)
        o.append(f'<text x="16" y="{y + 18}" font-size="14" font-weight="bold">{e(title)}</text>')
        if key == "ready_ms" and summary["ratios"]["ready"] is not None:
            o.append(
                f'<text x="{W - right}" y="{y + 18}" text-anchor="end" fill="#333">'
                f'tern/QEMU = {summary["ratios"]["ready"]:.2f}×</text>'
            )
        by = y + panel_head - 16
        axis_top, axis_bot = by - 4, by + len(systems) * (bar_h + gap)
        o.append(
            f'<line x1="{left}" y1="{axis_top}" x2="{left}" y2="{axis_bot}" stroke="#333"/>'
        )
        for s in systems:
            st = stats[s]
            o.append(
                f'<text x="{left - 8}" y="{by + bar_h / 2 + 4}" text-anchor="end">'
                f"{e(LABEL[s])}</text>"
            )
            if not st:
                sd = summary[s]
                why = "all runs failed" if sd and (sd["boot_runs"] or sd["mem_samples"]) else "no data"
                o.append(
                    f'<text x="{left + 8}" y="{by + bar_h / 2 + 4}" fill="#b00">{why}</text>'
                )
                by += bar_h + gap
                continue
            w = max(1.0, st["median"] * scale)
            o.append(
                f'<rect x="{left}" y="{by}" width="{w:.1f}" height="{bar_h}" '
                f'fill="{colors[s]}"/>'
            )
            cy = by + bar_h / 2
            x0, x1 = left + st["min"] * scale, left + st["max"] * scale
            o.append(
                f'<line x1="{x0:.1f}" y1="{cy}" x2="{x1:.1f}" y2="{cy}" stroke="#111" '
                'stroke-width="1.5"/>'
            )
            for xx in (x0, x1):
                o.append(
                    f'<line x1="{xx:.1f}" y1="{cy - 5}" x2="{xx:.1f}" y2="{cy + 5}" '
                    'stroke="#111" stroke-width="1.5"/>'
                )
            xp = left + st["p90"] * scale
            o.append(
                f'<circle cx="{xp:.1f}" cy="{cy}" r="3.5" fill="#fff" stroke="#111" '
                'stroke-width="1.5"/>'
            )
            label = f"{fmt_num(st['median'], unit)} {unit}"
            o.append(
                f'<text x="{max(x1, xp + 3.5, left + w) + 6:.1f}" y="{cy + 4}" fill="#111">'
                f"{e(label)}</text>"
            )
            by += bar_h + gap
        if target is not None:
            xt = left + target * scale
            o.append(
                f'<line x1="{xt:.1f}" y1="{axis_top}" x2="{xt:.1f}" y2="{axis_bot}" '
                'stroke="#1a8f3a" stroke-width="1.5" stroke-dasharray="5,4"/>'
            )
            o.append(
                f'<text x="{xt:.1f}" y="{axis_bot + 12}" text-anchor="middle" '
                f'fill="#1a8f3a" font-size="11">{e(tlabel)}</text>'
            )
        y += panel_h(len(systems)) + panel_gap
    o.append("</svg>")
    return "\n".join(o) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report(
    res: dict[str, dict[str, list[RunResult]]],
    facts: dict[str, Any],
    config: dict[str, Any],
    out_dir: Path,
) -> tuple[int, str, list[str]]:
    summary = build_summary(res)
    md = render_markdown(summary, facts, res, config)
    svg = render_svg(summary, facts)
    raw = {
        "facts": facts,
        "config": config,
        "summary": summary,
        "runs": {
            s: {k: [r.to_json() for r in v] for k, v in kinds.items()} for s, kinds in res.items()
        },
    }
    write_atomic(out_dir / "boot.md", md)
    write_atomic(out_dir / "boot.svg", svg)
    write_atomic(out_dir / "boot.json", json.dumps(raw, indent=2) + "\n")
    # exit status: 1 if every run of a measured system failed
    rc = 0
    for s, kinds in res.items():
        for kind in ("boot", "mem"):
            rs = kinds[kind]
            if rs and not any(r.ok for r in rs):
                rc = 1
    return rc, md, headlines(summary)


# ----------------------------------------------------------------------------- main


def default_paths() -> dict[str, Path]:
    rel = REPO / "target" / "release"
    return {
        "tern": rel / "tern",
        "kernel": rel / "tern-vmlinux",
        "initrd": rel / "tern-initramfs.cpio",
        "out": REPO / "tests" / "bench" / "results",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = default_paths()
    ap = argparse.ArgumentParser(
        description="tern vs QEMU microvm: boot → agent ready and VMM memory overhead.",
    )
    ap.add_argument("--runs", type=int, default=10, help="boot runs per system (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up boots per system (1)")
    ap.add_argument("--mem-samples", type=int, default=3, help="memory samples per system (3)")
    ap.add_argument("--timeout", type=float, default=120, help="per-run timeout, s (120)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds after the marker before reading smaps (1.0)")  # fmt: skip
    ap.add_argument("--memory", type=int, default=256, help="guest memory, MiB (256)")
    ap.add_argument("--systems", default="tern,qemu,tern-unfiltered",
                    help="comma list of tern,qemu,tern-unfiltered (tern with [vmm] seccomp = \"off\")")  # fmt: skip
    ap.add_argument("--tern", type=Path, default=d["tern"])
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", type=Path, default=d["kernel"],
                    help="guest kernel for both (default target/release/tern-vmlinux)")  # fmt: skip
    ap.add_argument("--initrd", type=Path, default=d["initrd"],
                    help="initramfs for both (default target/release/tern-initramfs.cpio)")  # fmt: skip
    ap.add_argument("--qemu-vsock", choices=("auto", "on", "off"), default="auto",
                    help="give QEMU a vhost-vsock device (auto: if /dev/vhost-vsock exists)")  # fmt: skip
    ap.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                    help="boot the inputs in place instead of private copies in $TMPDIR")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, default=d["out"])
    ap.add_argument("--rerender", type=Path, metavar="BOOT_JSON",
                    help="only re-render the report from an earlier boot.json")  # fmt: skip
    ap.add_argument("--selftest", action="store_true",
                    help="test parsing/statistics/report/process logic with fake VMMs")  # fmt: skip
    a = ap.parse_args(argv)
    if a.runs < 1 or a.warmup < 0 or a.mem_samples < 0 or a.timeout <= 0 or a.memory < 16:
        ap.error("need --runs ≥ 1, --warmup ≥ 0, --mem-samples ≥ 0, --timeout > 0, --memory ≥ 16")
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad or not a.systems:
        ap.error(f"--systems: unknown {bad}; use {', '.join(SYSTEMS)}")
    return a


def rerender(json_path: Path, out_dir: Path) -> int:
    """Re-render boot.md / boot.svg (and boot.json) from an earlier boot.json, no measuring."""
    raw = json.loads(json_path.read_text())
    fields = set(RunResult.__dataclass_fields__)
    res = {
        s: {k: [RunResult(**{f: v for f, v in r.items() if f in fields}) for r in rs]
            for k, rs in kinds.items()}
        for s, kinds in raw["runs"].items()
    }  # fmt: skip
    rc, md, heads = report(res, raw["facts"], raw["config"], out_dir)
    print(md)
    print()
    for h in heads:
        print(h)
    return rc


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.selftest:
        return selftest()
    if a.rerender:
        return rerender(a.rerender, a.out_dir)
    missing = [str(p) for p in (a.kernel, a.initrd) if not p.exists()]
    if any(s.startswith("tern") for s in a.systems) and not a.tern.exists():
        missing.append(str(a.tern))
    if missing:
        log("missing: " + ", ".join(missing) + " — run `make build` first")
        return 2
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log("warning: /dev/kvm is not usable here; every run will fail (use tests/bench/run.sh)")
    vsock = a.qemu_vsock == "on" or (
        a.qemu_vsock == "auto" and os.path.exists("/dev/vhost-vsock")
    )
    inputs = {"kernel": a.kernel.absolute(), "initrd": a.initrd.absolute()}
    if any(s.startswith("tern") for s in a.systems):
        inputs["tern"] = a.tern.absolute()
    origin = None
    if a.snapshot:
        snapdir = Path(tempfile.mkdtemp(prefix="tern-bench-"))
        atexit.register(lambda: __import__("shutil").rmtree(snapdir, ignore_errors=True))
        try:
            origin, inputs = inputs, snapshot(inputs, snapdir)
        except OSError as e:
            log(f"cannot copy the inputs to {snapdir}: {e}")
            return 2
    setup = Setup(
        tern=inputs.get("tern", a.tern.absolute()), qemu=a.qemu, kernel=inputs["kernel"],
        initrd=inputs["initrd"], memory_mib=a.memory, qemu_vsock=vsock,
        timeout=a.timeout, settle=a.settle,
    )  # fmt: skip
    if "tern-unfiltered" in a.systems:
        off = Path(tempfile.mkdtemp(prefix="tern-bench-config-")) / "seccomp-off.toml"
        off.write_text('[vmm]\nseccomp = "off"\n')
        atexit.register(lambda: __import__("shutil").rmtree(off.parent, ignore_errors=True))
        setup.unfiltered_config = off
    facts = host_facts(setup, origin)
    config = {
        "runs": a.runs,
        "warmup": a.warmup,
        "mem_samples": a.mem_samples,
        "timeout_s": a.timeout,
        "settle": a.settle,
        "systems": a.systems,
        "tern_cmd": shlex.join(setup.tern_cmd(["true"])),
        "qemu_cmd": shlex.join(setup.qemu_cmd()),
    }
    log(
        f"{facts['environment']}; kernel {facts['kernel'].get('resolved', a.kernel)}; "
        f"{a.runs} runs × {', '.join(a.systems)}; QEMU vsock: {'on' if vsock else 'off'}"
    )
    res = run_all(setup, a.systems, a.runs, a.warmup, a.mem_samples)
    rc, md, heads = report(res, facts, config, a.out_dir)
    print(md)
    print()
    for h in heads:
        print(h)
    log(f"wrote {a.out_dir}/boot.md, boot.svg, boot.json")
    if rc:
        log("every run of at least one system failed")
    return rc


# ----------------------------------------------------------------------------- selftest

FAKE_SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234                       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
Shared_Clean:          0 kB
Private_Clean:       800 kB
Private_Dirty:         0 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:               40960 kB
Pss:               40960 kB
Private_Clean:         0 kB
Private_Dirty:     40960 kB
THPeligible:    1
VmFlags: rd wr mr mw me ac
7f0010000000-7f0010200000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                1024 kB
Private_Clean:         0 kB
Private_Dirty:      1024 kB
7f0020000000-7f0020400000 r--s 00000000 00:05 99                         /memfd:foo (deleted)
Size:               4096 kB
Rss:                2048 kB
Shared_Clean:       2048 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
"""

# fake VMM: maps `MIB` MiB anonymous "guest RAM", touches `TOUCH` MiB of it, prints the marker
# after `DELAY` s, then the tern timings line, then sleeps `HOLD` s; exits with `RC`.
FAKE_VMM = r"""
import mmap, os, sys, time
mib, touch, delay, hold, rc = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, touch << 20, 4096):
    m[off] = 1
time.sleep(delay)
sys.stdout.write("[    0.1] booting\nTERN-AGENT-READY\n"); sys.stdout.flush()
time.sleep(hold)
sys.stderr.write("tern timings: vmm_start=0ms kernel_entry=12.5ms agent_ready=80.0ms command_exit=95.5ms vm_down=101.0ms\n")
sys.exit(rc)
"""


class FakeSetup:
    """Drives watch() with fake VMMs: tern = fake that exits, qemu = fake that stays up."""

    def __init__(self, script: str, tern_ok: bool, qemu_ok: bool, timeout: float = 10) -> None:
        self.script, self.tern_ok, self.qemu_ok, self.timeout = script, tern_ok, qemu_ok, timeout
        self.settle = 0.2

    def cmd(self, delay: float, hold: float, rc: int) -> list[str]:
        return [sys.executable, self.script, "64", "8", str(delay), str(hold), str(rc)]

    def boot(self, system: str) -> RunResult:
        if system == "tern-unfiltered":
            return watch(self.cmd(0.02, 0.05, 0), self.timeout, kill_after_marker=False)
        if system == "tern":
            c = self.cmd(0.05, 0.05, 0) if self.tern_ok else ["sh", "-c", "echo boom >&2; exit 3"]
            return watch(c, self.timeout, kill_after_marker=False)
        if not self.qemu_ok:
            return watch(["sleep", "5"], 0.5, kill_after_marker=True)
        return watch(self.cmd(0.1, 30, 0), self.timeout, kill_after_marker=True)

    def memory(self, system: str) -> RunResult:
        s = lambda pid: measure_memory(pid, 64 * MiB)  # noqa: E731
        ok = self.tern_ok if system.startswith("tern") else self.qemu_ok
        if not ok:
            return watch(["sh", "-c", "exit 1"], self.timeout, False, self.settle, s)
        kill = system == "qemu"
        return watch(self.cmd(0.05, 0.6 if not kill else 30, 0), self.timeout, kill, self.settle, s)


def selftest() -> int:
    failures = 0

    def check(cond: bool, what: str) -> None:
        nonlocal failures
        if not cond:
            failures += 1
            print(f"selftest FAIL: {what}", file=sys.stderr)

    # statistics
    check(quantile([1, 2, 3, 4], 0.5) == 2.5, "median even")
    check(quantile([5], 0.9) == 5, "single")
    check(abs(quantile(list(range(1, 11)), 0.9) - 9.1) < 1e-9, "p90 linear")
    st = summarize([3.0, None, 1.0, 2.0])
    check(st == {"n": 3, "median": 2.0, "p90": 2.8, "min": 1.0, "max": 3.0}, f"summarize {st}")
    check(summarize([None, None]) is None, "summarize empty")
    check(ratio({"median": 1.0}, {"median": 4.0}) == 0.25, "ratio")
    check(ratio(None, {"median": 4.0}) is None, "ratio none")

    # timings line
    tm = parse_tern_timings(
        "warn: x\ntern timings: vmm_start=0ms kernel_entry=12.5ms agent_ready=80ms "
        "command_exit=95.5ms vm_down=101.0ms\n"
    )
    check(
        tm == {"vmm_start": 0, "kernel_entry": 12.5, "agent_ready": 80, "command_exit": 95.5,
               "vm_down": 101.0},
        f"timings {tm}",
    )  # fmt: skip
    tm = parse_tern_timings("tern timings: vmm_start=0ms kernel_entry=n/a agent_ready=7.0ms")
    check(tm is not None and tm["kernel_entry"] is None and tm["agent_ready"] == 7.0, f"n/a {tm}")
    check(parse_tern_timings("nothing here") is None, "no timings")
    check(ANSI_RE.sub("", "\x1b[2mT\x1b[0m \x1b[31mERROR\x1b[0m x") == "T ERROR x", "ansi strip")

    # smaps
    vmas = parse_smaps(FAKE_SMAPS)
    check(len(vmas) == 4, f"vma count {len(vmas)}")
    check(vmas[1].path == "" and vmas[1].anonymous and vmas[1].size == 256 * MiB, "anon vma")
    check(not vmas[0].anonymous and vmas[3].anonymous, "file vs memfd")
    g = find_guest_memory(vmas, 256 * MiB)
    check(len(g) == 1 and g[0] is vmas[1], "guest mapping exact")
    check(find_guest_memory(vmas, 128 * MiB) == [], "no guest mapping")
    split = parse_smaps(
        "10000000-18000000 rw-p 00000000 00:00 0\nRss: 10 kB\n"
        "100000000-108000000 rw-p 00000000 00:00 0\nRss: 20 kB\n"
        "200000000-200001000 rw-p 00000000 00:00 0\nRss: 4 kB\n"
    )
    g = find_guest_memory(split, 256 * MiB)
    check(len(g) == 2 and sum(v.rss for v in g) == 30 * 1024, "guest mapping split in two")
    slack = parse_smaps("10000000-20200000 rw-p 00000000 00:00 0\nRss: 10 kB\n")
    check(len(find_guest_memory(slack, 256 * MiB)) == 1, "guest mapping with slack")
    check(find_guest_memory(parse_smaps("10000000-20000000 r--p 00000000 00:00 0\n"), 256 * MiB)
          == [], "read-only mapping is not guest RAM")  # fmt: skip
    total = sum(v.rss for v in vmas)
    check(total == (800 + 40960 + 1024 + 2048) * 1024, "rss total")

    # the process machinery and the whole report, with fake VMMs
    with tempfile.TemporaryDirectory() as td:
        script = os.path.join(td, "fakevmm.py")
        Path(script).write_text(FAKE_VMM)

        m = measure_memory(os.getpid(), 1 << 40)
        check(not m["ok"] and "no guest-memory" in m["error"], "measure self without guest map")

        r = watch([sys.executable, script, "64", "8", "0.1", "0.1", "0"], 10, False)
        check(r.ok and r.ready_ms is not None and r.ready_ms >= 100, f"watch ok {r.error}")
        check(r.exit_ms is not None and r.exit_ms >= r.ready_ms + 100, "exit after marker")
        check(r.timings is not None and r.timings["agent_ready"] == 80.0, "timings parsed")
        r = watch([sys.executable, script, "64", "8", "0.05", "0.05", "7"], 10, False)
        check(not r.ok and r.error == "exit status 7", f"nonzero exit: {r.error}")
        r = watch(["sh", "-c", "echo hi; sleep 30"], 0.5, False)
        check(not r.ok and r.timed_out and "without the marker" in (r.error or ""), "timeout")
        r = watch(["/nonexistent/vmm"], 5, False)
        check(not r.ok and "cannot spawn" in (r.error or ""), "spawn failure")
        t0 = time.monotonic()
        r = watch([sys.executable, script, "64", "8", "0.05", "60", "0"], 20, True, 0.3,
                  lambda pid: measure_memory(pid, 64 * MiB))  # fmt: skip
        el = time.monotonic() - t0
        check(r.ok and r.killed_by_bench and el < 10, f"kill after marker + sample ({el:.1f}s)")
        mem = r.mem or {}
        check(
            mem.get("ok") and 7 <= mem["guest_rss_mib"] <= 9 and mem["overhead_rss_mib"] > 1,
            f"memory sample {mem}",
        )
        # tern-like: process exits before the sample is due -> failure
        r = watch([sys.executable, script, "64", "8", "0.05", "0.0", "0"], 10, False, 2.0,
                  lambda pid: measure_memory(pid, 64 * MiB))  # fmt: skip
        check(not r.ok and "memory sample" in (r.error or ""), f"late sample: {r.error}")

        out = Path(td) / "results"
        facts = {
            "date_utc": "2026-11-26 12:00:00 UTC", "nested_runner": True,
            "environment": "selftest", "kvm_modules": ["kvm_amd"], "kvm_nested_param": None,
            "uname": "x", "cpu": "fake", "nproc": 2, "mem_total_mib": 1,
            "dev_vhost_vsock": False, "qemu_version": "fake", "tern_version": "fake",
            "git": "abc", "kernel": {"path": "k", "sha256": "0" * 64},
            "initrd": {"path": "i", "sha256": "1" * 64, "size_bytes": 1},
            "guest_memory_mib": 64, "qemu_vsock": False,
        }  # fmt: skip
        config = {"runs": 3, "warmup": 1, "mem_samples": 2, "settle": 0.2,
                  "tern_cmd": "tern run", "qemu_cmd": "qemu"}  # fmt: skip
        # tern-unfiltered (VMM seccomp off) gets its own table and ratios next to tern
        res = run_all(FakeSetup(script, True, True), ["tern", "qemu", "tern-unfiltered"], 2, 0, 1)
        rc, md, heads = report(res, facts, config, out)
        ratios = json.loads((out / "boot.json").read_text())["summary"]["ratios"]
        check(rc == 0 and "| metric | tern | tern, VMM seccomp off | ratio (filters on/off) |" in md,
              "tern-unfiltered: seccomp table")  # fmt: skip
        check(ratios["seccomp_ready"] is not None and ratios["seccomp_ready"] > 1.0,
              f"tern-unfiltered: the fake unfiltered tern is readier sooner: {ratios}")  # fmt: skip
        check(any(h.startswith("VMM seccomp filters:") for h in heads), f"tern-unfiltered: headline {heads}")
        for tern_ok, qemu_ok, want_rc in ((True, True, 0), (False, True, 1), (True, False, 1)):
            fs = FakeSetup(script, tern_ok, qemu_ok)
            res = run_all(fs, ["tern", "qemu"], 3, 1, 2)
            rc, md, heads = report(res, facts, config, out)
            tag = f"tern_ok={tern_ok} qemu_ok={qemu_ok}"
            check(rc == want_rc, f"{tag}: rc {rc} != {want_rc}")
            check("| metric | tern | QEMU microvm | ratio (tern/QEMU) |" in md, f"{tag}: table")
            svg = (out / "boot.svg").read_text()
            try:
                ET.fromstring(svg)
            except ET.ParseError as e:
                check(False, f"{tag}: svg not well-formed: {e}")
            raw = json.loads((out / "boot.json").read_text())
            nb = len(raw["runs"]["tern"]["boot"])
            check(nb == 3, f"{tag}: json runs {nb}")
            if tern_ok and qemu_ok:
                s = raw["summary"]
                check(s["tern"]["boot_failures"] == 0 and s["qemu"]["boot_failures"] == 0,
                      f"{tag}: no failures")  # fmt: skip
                check(s["ratios"]["ready"] is not None and s["ratios"]["ready"] < 1.0,
                      f"{tag}: ready ratio {s['ratios']['ready']}")  # fmt: skip
                check(s["tern"]["timings_agent_ready_ms"]["median"] == 80.0, f"{tag}: timings")
                check(s["tern"]["overhead_rss_mib"] is not None, f"{tag}: tern overhead")
                check("## Failures" not in md, f"{tag}: no failure section")
                check(any("target ≤ 0.5×" in h for h in heads), f"{tag}: headline")
            else:
                check("## Failures" in md, f"{tag}: failure section")
                check("all 3 failed" in md, f"{tag}: 'all failed' cell")
                check("all runs failed" in svg, f"{tag}: svg marks failure")
                bad = "tern" if not tern_ok else "qemu"
                check(raw["summary"][bad]["boot_failures"] == 3, f"{tag}: failures counted")
                check(raw["runs"][bad]["boot"][0]["error"], f"{tag}: error recorded")
            if tern_ok and qemu_ok:
                keep = Path(tempfile.gettempdir()) / "tern-bench-selftest"
                keep.mkdir(exist_ok=True)
                for f in ("boot.md", "boot.svg", "boot.json"):
                    (keep / f).write_text((out / f).read_text())
        # re-rendering from boot.json gives the same report
        before = (out / "boot.md").read_text()
        (Path(td) / "saved.json").write_text((out / "boot.json").read_text())
        with open(os.devnull, "w") as dn:
            so, sys.stdout = sys.stdout, dn
            try:
                rrc = rerender(Path(td) / "saved.json", out)
            finally:
                sys.stdout = so
        check(rrc == 1 and (out / "boot.md").read_text() == before, "rerender round trip")
        # single-system runs render too
        res = run_all(FakeSetup(script, True, True), ["qemu"], 2, 0, 1)
        rc, md, _ = report(res, facts, config, out)
        check(rc == 0 and "not measured" in md, "qemu-only report")
        ET.fromstring((out / "boot.svg").read_text())

    if failures:
        print(f"selftest: {failures} check(s) failed", file=sys.stderr)
        return 1
    print("selftest: all checks passed (sample report in "
          f"{Path(tempfile.gettempdir()) / 'tern-bench-selftest'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
