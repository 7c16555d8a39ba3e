#!/usr/bin/env python3
"""tern virtio-fs benchmark: the same workload inside the same guest kernel, on

  tern      tern's built-in virtio-fs device (`tern boot --share`, the VMM alone, no agent)
  virtiofsd QEMU `-M microvm` + `vhost-user-fs-device` + virtiofsd (crates.io)
  fs-serve  QEMU `-M microvm` + `vhost-user-fs-device` + `tern fs-serve` (tern's file server
            as a vhost-user backend: same frontend as virtiofsd, different backend)

Every system boots the same initramfs: busybox-static with a workload script as /init that
mounts virtio-fs tag `tern` at /fs and works in /fs/bench, timing each phase with
/proc/uptime (busybox `date` has no %N; 10 ms resolution) and printing `@@FSB` lines on the
serial console, then `reboot -f`. Phases: sequential write of --size MiB (dd bs=1M,
conv=fsync), drop caches, sequential read of it, then --files small files created (xargs
touch), stat'ed and unlinked, with caches dropped before stat and unlink so every lookup
reaches the file server. Parameters travel on the kernel command line (init's environment).
Host directories live under --dir (tmpfs in the runner), so the host side is RAM for all.

Ratios are tern / peer, higher is better for every metric (MiB/s, ops/s). Targets: built-in
>= 1.0x virtiofsd on throughput, >= 1.2x on metadata ops. Writes results/fs.md and fs.json.

  fs_bench.py --prepare      host side, before the runner: apt deps + virtiofsd into
                             ${TERN_CACHE:-~/.cache/tern}/bin/ (cargo install virtiofsd --locked)
  fs_bench.py [options]      inside tests/nested-runner (tests/bench/run.sh does both)
  fs_bench.py --selftest     parsing and report logic, no KVM

Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TERN_CACHE") or Path.home() / ".cache/tern")
VIRTIOFSD = CACHE / "bin/virtiofsd"
APT_DEPS = ("libseccomp-dev", "libcap-ng-dev")
TAG = "tern"
# tern-unfiltered: the built-in device with `[vmm] seccomp = "off"`, to price the VMM threads'
# filters (the tern-fs thread serves every request under its filter).
SYSTEMS = ("tern", "virtiofsd", "fs-serve", "tern-unfiltered")
LABEL = {"tern": "tern built-in", "virtiofsd": "QEMU+virtiofsd", "fs-serve": "QEMU+tern fs-serve",
         "tern-unfiltered": "tern built-in, VMM seccomp off"}
# metric -> (label, unit, target ratio vs virtiofsd or None)
METRICS = {
    "write_mib_s": ("sequential write", "MiB/s", 1.0),
    "read_mib_s": ("sequential read", "MiB/s", 1.0),
    "create_ops_s": ("small-file create", "ops/s", 1.2),
    "stat_ops_s": ("small-file stat", "ops/s", 1.2),
    "unlink_ops_s": ("small-file unlink", "ops/s", 1.2),
}
QEMU_CMDLINE = "console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1"

INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /fs /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
now() { read up _ < /proc/uptime; echo "$up"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fail() { echo "@@FSB-FAIL $*"; sync; reboot -f; }
size=${fsb_size:-64}
files=${fsb_files:-1000}
mount -t virtiofs tern /fs || fail mount
d=/fs/bench
[ -d "$d" ] || fail "no $d"
echo "@@FSB start size_mib=$size files=$files"
t0=$(now)
dd if=/dev/zero of=$d/big bs=1M count=$size conv=fsync 2>/dev/null || fail write
t1=$(now)
drop
t2=$(now)
dd if=$d/big of=/dev/null bs=1M 2>/dev/null || fail read
t3=$(now)
rm $d/big || fail "rm big"
mkdir $d/small || fail mkdir
cd $d/small
seq 1 $files > /tmp/names
t4=$(now)
xargs touch < /tmp/names || fail create
sync
t5=$(now)
drop
t6=$(now)
xargs stat -c %s < /tmp/names > /dev/null || fail stat
t7=$(now)
drop
t8=$(now)
xargs rm < /tmp/names || fail unlink
sync
t9=$(now)
cd /
rmdir $d/small || fail rmdir
echo "@@FSB times write=$t0,$t1 read=$t2,$t3 create=$t4,$t5 stat=$t6,$t7 unlink=$t8,$t9"
echo "@@FSB-DONE"
umount /fs
reboot -f
"""


def log(msg: str) -> None:
    print(f"fs-bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- host preparation


def prepare() -> int:
    """Host side (outside the runner, where / is writable): deps and the virtiofsd binary."""
    missing = []
    for pkg in APT_DEPS:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            missing.append(pkg)
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)
    if VIRTIOFSD.is_file() and os.access(VIRTIOFSD, os.X_OK):
        log(f"virtiofsd: {VIRTIOFSD} (cached)")
        return 0
    build_root = CACHE / "virtiofsd-build"
    log(f"cargo install virtiofsd --locked (into {build_root}; takes a few minutes)")
    subprocess.run(["cargo", "install", "virtiofsd", "--locked", "--root", str(build_root)], check=True)
    VIRTIOFSD.parent.mkdir(parents=True, exist_ok=True)
    tmp = VIRTIOFSD.with_suffix(".tmp")
    shutil.copy2(build_root / "bin/virtiofsd", tmp)
    tmp.replace(VIRTIOFSD)
    log(f"virtiofsd: {VIRTIOFSD}")
    return 0


# ---------------------------------------------------------------- guest output parsing


def parse_console(text: str) -> dict[str, float]:
    """Phase durations from the `@@FSB times` line; raises ValueError if missing or failed."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("@@FSB-FAIL"):
            raise ValueError(f"guest workload failed: {line[len('@@FSB-FAIL'):].strip()}")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("@@FSB times "):
            out = {}
            for part in line[len("@@FSB times "):].split():
                name, _, span = part.partition("=")
                a, _, b = span.partition(",")
                out[name] = float(b) - float(a)
            if set(out) != {"write", "read", "create", "stat", "unlink"}:
                raise ValueError(f"incomplete times line: {line}")
            return out
    raise ValueError("no @@FSB times line on the console")


def to_metrics(phases: dict[str, float], size_mib: int, files: int) -> dict[str, float | None]:
    """Durations -> rates; a phase under the clock's 10 ms resolution gives None."""

    def rate(amount: float, secs: float) -> float | None:
        return amount / secs if secs >= 0.01 else None

    return {
        "write_mib_s": rate(size_mib, phases["write"]),
        "read_mib_s": rate(size_mib, phases["read"]),
        "create_ops_s": rate(files, phases["create"]),
        "stat_ops_s": rate(files, phases["stat"]),
        "unlink_ops_s": rate(files, phases["unlink"]),
    }


# ---------------------------------------------------------------- running guests


def build_initramfs(work: Path) -> Path:
    root = work / "initramfs-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    out = work / "fs-bench.cpio"
    with open(out, "wb") as f:
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, stdout=f, check=True)
    return out


def kill_tree(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def wait_socket(path: Path, proc: subprocess.Popen, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no socket {path} after {limit} s")
        time.sleep(0.02)


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path, initrd: Path, tern: Path, kernel: Path):
        self.a = args
        self.work = work
        self.initrd = initrd
        self.tern = tern
        self.kernel = kernel
        self.params = f"fsb_size={args.size} fsb_files={args.files}"
        self.unfiltered_config = work / "seccomp-off.toml"
        self.unfiltered_config.write_text('[vmm]\nseccomp = "off"\n')

    def qemu_cmd(self, socket: Path) -> list[str]:
        m = self.a.memory
        return [
            self.a.qemu, "-M", "microvm,acpi=off,memory-backend=mem", "-accel", self.a.accel,
            "-cpu", "host" if self.a.accel == "kvm" else "max", "-m", str(m),
            "-object", f"memory-backend-memfd,id=mem,size={m}M,share=on",
            "-chardev", f"socket,id=fs0,path={socket}",
            "-device", f"vhost-user-fs-device,chardev=fs0,tag={TAG}",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", f"{QEMU_CMDLINE} {self.params}",
        ]

    def backend_cmd(self, system: str, socket: Path, shared: Path) -> list[str]:
        if system == "virtiofsd":
            # The same cache policy as tern's default (auto: close-to-open, 1 s timeouts), no
            # writeback (tern has none); no namespace sandbox (tern fs-serve has none either).
            return [str(self.a.virtiofsd), f"--socket-path={socket}", f"--shared-dir={shared}",
                    "--cache=auto", "--sandbox=none", "--log-level=error"]
        return [str(self.tern), "fs-serve", "--socket", str(socket), "--shared-dir", str(shared),
                "--tag", TAG, "--cache", "auto"]

    def run_once(self, system: str, index: int) -> dict[str, Any]:
        """One boot of `system`; returns {"ok", "metrics"|"error", "wall_s", "console_tail"}."""
        root = self.work / f"{system}-{index}"
        shared = root / "share"
        (shared / "bench").mkdir(parents=True)
        socket = root / "fs.sock"
        procs: list[subprocess.Popen] = []
        started = time.monotonic()
        console = ""
        try:
            if system.startswith("tern"):
                config = ["--config", str(self.unfiltered_config)] if system == "tern-unfiltered" else []
                cmd = [str(self.tern), *config, "boot", "--kernel", str(self.kernel), "--initrd", str(self.initrd),
                       "--share", f"{shared / 'bench'}:bench", "--memory", str(self.a.memory),
                       "--cmdline", self.params, "--timeout", str(int(self.a.timeout))]
            else:
                backend = subprocess.Popen(self.backend_cmd(system, socket, shared), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=open(root / "backend.log", "wb"),
                                           start_new_session=True)
                procs.append(backend)
                wait_socket(socket, backend, 30)
                cmd = self.qemu_cmd(socket)
            vm = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(vm)
            try:
                out, _ = vm.communicate(timeout=self.a.timeout)
            except subprocess.TimeoutExpired:
                kill_tree(vm)
                out, _ = vm.communicate()
                console = out.decode(errors="replace")
                raise RuntimeError(f"guest did not finish within {self.a.timeout} s") from None
            console = out.decode(errors="replace")
            phases = parse_console(console)
            big = shared / "bench/big"
            if big.exists() or any((shared / "bench").iterdir()):
                raise RuntimeError("the guest's cleanup did not reach the host")
            return {"ok": True, "phases": phases, "metrics": to_metrics(phases, self.a.size, self.a.files),
                    "wall_s": time.monotonic() - started}
        except Exception as e:  # noqa: BLE001 - recorded per run, the bench goes on
            return {"ok": False, "error": str(e), "wall_s": time.monotonic() - started,
                    "console_tail": console[-3000:]}
        finally:
            for p in procs:
                # Backends exit by themselves once QEMU is gone; give them a moment.
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_tree(p)
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- report


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for s, runs in results.items():
        ok = [r for r in runs if r["ok"]]
        out[s] = {m: median([r["metrics"][m] for r in ok]) for m in METRICS}
        # Host wall clock of the whole boot + workload: a cross-check of the guest's clock.
        out[s]["wall_s"] = median([r["wall_s"] for r in ok])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"


def render(summary: dict, results: dict, args: argparse.Namespace, facts: dict) -> tuple[str, list[str]]:
    systems = [s for s in SYSTEMS if s in summary]
    peer = "virtiofsd"
    lines = [
        "# virtio-fs: tern built-in vs QEMU microvm + virtiofsd",
        "",
        f"Same guest kernel, same busybox-script initramfs, one {facts['where']} run on {facts['date']}. "
        f"Sequential write/read of **{args.size} MiB**, **{args.files:,}** small files; "
        f"medians of {args.runs} run(s) per system; higher is better; ratio = tern built-in / QEMU+virtiofsd.",
        "",
    ]
    head = ["metric", LABEL["tern"], LABEL[peer], "ratio", "target"]
    if "fs-serve" in systems:
        head += [LABEL["fs-serve"], "fs-serve / virtiofsd"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for m, (label, unit, target) in METRICS.items():
        t, p = summary.get("tern", {}).get(m), summary.get(peer, {}).get(m)
        r = ratio(t, p)
        ok = None if r is None else r >= target
        verdicts.append(f"{label}: {'n/a' if r is None else f'{r:.2f}x'}"
                        f" ({'target ' + format(target, '.1f') + 'x ' + ('met' if ok else 'missed') if ok is not None else 'no data'})")
        row = [label, fmt(t, unit), fmt(p, unit), "n/a" if r is None else f"**{r:.2f}x**", f">= {target:.1f}x"]
        if "fs-serve" in systems:
            f = summary["fs-serve"].get(m)
            rf = ratio(f, p)
            row += [fmt(f, unit), "n/a" if rf is None else f"{rf:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    t, p = summary.get("tern", {}).get("wall_s"), summary.get(peer, {}).get("wall_s")
    r = ratio(p, t)
    row = ["whole run, host wall clock (lower is better; ratio = peer / tern)", fmt(t, "s"), fmt(p, "s"),
           "n/a" if r is None else f"{r:.2f}x", "-"]
    if "fs-serve" in systems:
        f = summary["fs-serve"].get("wall_s")
        rf = ratio(p, f)
        row += [fmt(f, "s"), "n/a" if rf is None else f"{rf:.2f}x"]
    lines.append("| " + " | ".join(row) + " |")
    if "tern-unfiltered" in systems:
        lines += ["", "The VMM threads' seccomp filters: tern built-in as shipped vs with `[vmm] seccomp = \"off\"`, "
                  "interleaved in this run (ratio = filters on / off; 1.00x = no cost).", "",
                  f"| metric | {LABEL['tern']} | {LABEL['tern-unfiltered']} | filters on / off |", "|---|---|---|---|"]
        for m, (label, unit, _) in METRICS.items():
            t, u = summary.get("tern", {}).get(m), summary["tern-unfiltered"].get(m)
            r = ratio(t, u)
            lines.append(f"| {label} | {fmt(t, unit)} | {fmt(u, unit)} | {'n/a' if r is None else f'{r:.2f}x'} |")
    fails = {s: [r["error"] for r in runs if not r["ok"]] for s, runs in results.items()}
    lines += ["", "Setup: " + facts["setup"], ""]
    if any(fails.values()):
        lines.append("Failed runs:")
        for s, errs in fails.items():
            for e in errs:
                lines.append(f"- {LABEL[s]}: {e}")
        lines.append("")
    lines.append("Everything inside the nested runner is emulated: compare ratios, not absolute numbers.")
    return "\n".join(lines) + "\n", verdicts


def facts_for(args: argparse.Namespace) -> dict[str, str]:
    inside = os.environ.get("TERN_RUNNER_INSIDE") == "1"
    vfsd = subprocess.run([str(args.virtiofsd), "--version"], capture_output=True, text=True).stdout.strip() \
        if Path(args.virtiofsd).exists() else "virtiofsd missing"
    qemu = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "where": "tests/nested-runner (QEMU TCG outer VM, nested KVM)" if inside else "direct",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": f"guest {args.memory} MiB, 1 vCPU, cache=auto everywhere, no writeback cache, no DAX; "
                 f"host dirs on {args.dir} ({'tmpfs' if str(args.dir).startswith('/tmp') else 'disk'}); "
                 f"{vfsd} (--sandbox=none, default seccomp); {qemu[0] if qemu else 'qemu ?'}; "
                 f"phases timed in the guest with /proc/uptime (10 ms).",
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="host side: install deps and virtiofsd, then exit")
    ap.add_argument("--selftest", action="store_true", help="check parsing/report logic (no KVM)")
    ap.add_argument("--size", type=int, help="sequential write/read size, MiB (1024; 256 in the runner)")
    ap.add_argument("--files", type=int, help="small files (10000; 2000 in the runner)")
    ap.add_argument("--runs", type=int, help="runs per system, interleaved (3; 2 in the runner)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory, MiB (512)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-boot limit, s (1800)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    ap.add_argument("--accel", default="kvm", help="QEMU accelerator (kvm; tcg only to debug QEMU runs)")
    ap.add_argument("--tern", type=Path, default=REPO / "target/release/tern")
    ap.add_argument("--kernel", type=Path, default=REPO / "target/release/tern-vmlinux")
    ap.add_argument("--virtiofsd", type=Path, default=VIRTIOFSD)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="host dirs go here (/tmp)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests/bench/results")
    a = ap.parse_args(argv)
    # Under the nested runner every guest exit is emulated: 1 GiB and 10,000 files per phase
    # take most of an hour for three systems, so the defaults there are scaled down (the
    # report states the sizes used).
    nested = os.environ.get("TERN_RUNNER_INSIDE") == "1" and Path("/sys/module/kvm_amd").exists()
    a.size = a.size or (256 if nested else 1024)
    a.files = a.files or (2000 if nested else 10000)
    a.runs = a.runs or (2 if nested else 3)
    bad = [s for s in a.systems.split(",") if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {bad}")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.selftest:
        return selftest()
    if args.prepare:
        return prepare()
    systems = args.systems.split(",")
    if "virtiofsd" in systems and not Path(args.virtiofsd).is_file():
        log(f"{args.virtiofsd} missing: run `fs_bench.py --prepare` on the host first")
        return 2
    with tempfile.TemporaryDirectory(prefix="tern-fs-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        # Snapshots: other builds may replace the binaries while this runs.
        tern = work / "tern"
        kernel = work / "vmlinux"
        shutil.copy2(args.tern, tern)
        shutil.copy2(args.kernel.resolve(), kernel)
        runner = Runner(args, work, build_initramfs(work), tern, kernel)
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for i in range(args.runs):
            for s in systems:
                log(f"run {i + 1}/{args.runs}: {LABEL[s]} (size {args.size} MiB, {args.files} files)")
                r = runner.run_once(s, i)
                if r["ok"]:
                    log("  " + ", ".join(f"{k} {v:.2f}s" for k, v in r["phases"].items()) + f" (wall {r['wall_s']:.1f}s)")
                else:
                    log(f"  FAILED: {r['error']}\n{r.get('console_tail', '')[-1500:]}")
                results[s].append(r)
    summary = summarize(results)
    facts = facts_for(args)
    md, verdicts = render(summary, results, args, facts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "fs.md").write_text(md)
    doc = {"params": {"size_mib": args.size, "files": args.files, "runs": args.runs, "memory_mib": args.memory},
           "facts": facts, "summary": summary,
           "ratios_vs_virtiofsd": {s: {m: ratio(summary[s][m], summary.get("virtiofsd", {}).get(m))
                                       for m in METRICS} for s in summary},
           "runs": results}
    (args.out_dir / "fs.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(md)
    print("ratios (tern built-in / QEMU+virtiofsd): " + "; ".join(verdicts))
    return 0 if all(any(r["ok"] for r in runs) for runs in results.values()) else 1


def selftest() -> int:
    console = "junk\r\n@@FSB start size_mib=8 files=100\r\n" \
              "@@FSB times write=1.00,1.50 read=2.00,2.25 create=3.00,4.00 stat=5.00,5.50 unlink=6.00,6.00\r\n"
    phases = parse_console(console)
    assert phases == {"write": 0.5, "read": 0.25, "create": 1.0, "stat": 0.5, "unlink": 0.0}, phases
    m = to_metrics(phases, 8, 100)
    assert m["write_mib_s"] == 16 and m["read_mib_s"] == 32 and m["create_ops_s"] == 100
    assert m["unlink_ops_s"] is None
    for bad in ("nothing", "@@FSB-FAIL write\n@@FSB times write=1,2"):
        try:
            parse_console(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {bad!r}")
    ok = {"ok": True, "metrics": m, "wall_s": 10.0}
    results = {"tern": [ok], "virtiofsd": [{"ok": True, "metrics": {k: (v / 2 if v else v) for k, v in m.items()},
                                            "wall_s": 20.0},
                                           {"ok": False, "error": "boom"}], "fs-serve": [ok],
               "tern-unfiltered": [{"ok": True, "metrics": {k: (v * 2 if v else v) for k, v in m.items()},
                                    "wall_s": 5.0}]}
    summary = summarize(results)
    assert summary["virtiofsd"]["write_mib_s"] == 8
    args = argparse.Namespace(size=8, files=100, runs=1)
    md, verdicts = render(summary, results, args, {"where": "test", "date": "now", "setup": "x"})
    assert "**2.00x**" in md and "boom" in md and "n/a" in md and "| 10.0 s | 20.0 s | 2.00x |" in md, md
    assert verdicts[0].startswith("sequential write: 2.00x"), verdicts
    assert "| filters on / off |" in md and "| 0.50x |" in md, md
    assert INIT_SCRIPT.startswith("#!/bin/sh\n") and "@@FSB times" in INIT_SCRIPT
    print("fs_bench selftest: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
