#!/usr/bin/env python3
"""Container benchmark through a real containerd: tern's shim vs runc, same containerd, same
image, same run.

Measures (runtime `io.containerd.tern.v2` vs `io.containerd.runc.v2`, Debian's runc):

1. container start, end to end: wall time of `ctr run --rm IMAGE true` (create, VM boot for
   tern, start, exit, delete), N runs each after one warm-up, interleaved; medians.
2. stdout throughput: `ctr run --rm IMAGE sh -c 'head -c SIZE /dev/zero'` with ctr's stdout
   read and counted here (like `| wc -c`); MiB/s from the first byte to EOF (the start is
   measured separately), plus the end-to-end wall time.
3. host memory per sandbox: RSS and PSS (/proc/<pid>/smaps_rollup) of the tern shim (which is
   the VMM too) with one idle container (`sleep`), and the part of it that is not guest RAM;
   for runc the shim plus the container's process.

The private containerd (own root/state/sockets under a temp dir, CRI off, `native`
snapshotter, `target/release` first on its PATH) and the one-layer busybox OCI image are built
the same way as the end-to-end tests do. Writes results/containerd.{md,json} and prints the
markdown. Targets (issue 4): start <= 4x runc, stdout >= 0.5x runc.

Runs inside tests/nested-runner (tests/bench/run.sh) on hosts whose KVM cannot boot Linux;
everything there is emulated, so only the ratios mean something. Python 3.11, stdlib only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
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
NAMESPACE = "tern-bench"
IMAGE = "docker.io/library/tern-busybox:bench"
RUNTIMES = {"tern": "io.containerd.tern.v2", "runc": "io.containerd.runc.v2"}
SHIM_BIN = {"tern": "containerd-shim-tern-v2", "runc": "containerd-shim-runc-v2"}
APPLETS = ("sh", "true", "head", "cat", "wc", "yes", "sleep", "seq")
TARGET_START_RATIO = 4.0  # tern start <= 4x runc
TARGET_STDOUT_RATIO = 0.5  # tern stdout throughput >= 0.5x runc
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"containerd-bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- image


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_image(work: Path) -> Path:
    """busybox-static rootfs -> gzip layer -> config, manifest, index.json; returns the tar."""
    rootfs = work / "image-rootfs"
    for d in ("bin", "dev", "proc", "sys", "etc", "tmp", "root", "run"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", rootfs / "bin/busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    layer = subprocess.run(
        ["tar", "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C", str(rootfs), "-cf", "-", "."],
        check=True, capture_output=True).stdout
    gz = gzip.compress(layer, mtime=0)
    layout = work / "image-layout"
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes) -> dict[str, Any]:
        h = sha256(data)
        (blobs / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256(layer)}"]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gz)}]
                           }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
        "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "bench"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    archive = work / "busybox-image.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    return archive


# ----------------------------------------------------------------------------- containerd


class Containerd:
    """A private containerd; `close()` kills its shims, stops it and removes its files."""

    def __init__(self, bin_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tern-ctrd-bench-", dir="/tmp"))
        self.address = self.dir / "ctrd.sock"
        (self.dir / "config.toml").write_text(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
""")
        (self.dir / "tern.toml").write_text(f'[vm]\nconsole_log = "{self.dir}/console.log"\n')
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}",
                   TERN_CONFIG=str(self.dir / "tern.toml"), TERN_RUN_DIR=str(self.dir / "vm"))
        self.log = open(self.dir / "containerd.log", "wb")
        self.proc = subprocess.Popen(["containerd", "--config", str(self.dir / "config.toml")],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 60
        while self.ctr(["version"], timeout=20).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("containerd did not come up:\n" + self.logs())
            time.sleep(0.2)

    def logs(self) -> str:
        text = ""
        for name in ("containerd.log", "console.log"):
            p = self.dir / name
            if p.exists():
                text += f"--- {name} ---\n" + p.read_text(errors="replace")[-4000:] + "\n"
        return text

    def ctr_args(self, args: list[str]) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", NAMESPACE, *args]

    def ctr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.ctr_args(args), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, -1, e.stdout or b"", (e.stderr or b"") + b"\n(timed out)")

    def shim_pids(self, kind: str, container: str | None = None) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            argv = [a.decode(errors="replace") for a in argv if a]
            text = " ".join(argv)
            # `… start` is the short-lived launcher; the long-lived shim has `-socket`.
            if SHIM_BIN[kind] in text and str(self.address) in text and argv[-1] not in ("start", "delete"):
                if container is None or f"-id {container}" in text:
                    pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        for kind in SHIM_BIN:
            for pid in self.shim_pids(kind):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(str(self.dir))), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- measurements


def run_flags(kind: str) -> list[str]:
    return ["run", "--rm", "--snapshotter", "native", "--runtime", RUNTIMES[kind]]


def measure_start(c: Containerd, kind: str, name: str, timeout: float) -> float:
    t0 = time.monotonic()
    r = c.ctr([*run_flags(kind), IMAGE, name, "true"], timeout)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ctr run {kind} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
    return dt


def measure_stdout(c: Containerd, kind: str, name: str, size: int, timeout: float) -> dict[str, float]:
    """Bytes/s of `head -c size /dev/zero` through ctr's stdout, first byte to EOF."""
    p = subprocess.Popen(c.ctr_args([*run_flags(kind), IMAGE, name, "sh", "-c", f"head -c {size} /dev/zero"]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    first = None
    total = 0
    fd = p.stdout.fileno()
    try:
        while True:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{kind}: stdout not done after {timeout} s ({total} bytes)")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            if first is None:
                first = time.monotonic()
            total += len(chunk)
        end = time.monotonic()
        rc = p.wait(timeout=max(1.0, timeout - (end - t0)))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read().decode(errors="replace")
    if rc != 0 or total != size or first is None:
        raise RuntimeError(f"{kind}: rc {rc}, {total} of {size} bytes: {err[-500:]}")
    return {"mib_per_s": size / MiB / max(end - first, 1e-9), "stream_s": end - first, "wall_s": end - t0}


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("Rss:", "Pss:"):
            out[parts[0][:-1].lower()] = int(parts[1]) * 1024
    return out


def guest_ram_rss(pid: int, guest_bytes: int) -> int:
    """Rss of the anonymous mapping(s) backing guest RAM (size >= guest_bytes)."""
    rss, size, anon = 0, 0, False
    total = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if anon and size >= guest_bytes:
                total += rss
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            size, rss, anon = hi - lo, 0, len(head) == 5
        elif head and head[0] == "Rss:":
            rss = int(head[1]) * 1024
    if anon and size >= guest_bytes:
        total += rss
    return total


def child_pids(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += child_pids(k)
    return out


def measure_memory(c: Containerd, kind: str, name: str, guest_mib: int, settle: float, timeout: float) -> dict:
    r = c.ctr([*run_flags(kind)[:1], "-d", *run_flags(kind)[2:], IMAGE, name, "sleep", "100000"], timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ctr run -d {kind} failed: {r.stderr.decode(errors='replace')[-500:]}")
    try:
        time.sleep(settle)
        pids = c.shim_pids(kind, None if kind == "tern" else name)
        if len(pids) != 1:
            raise RuntimeError(f"expected one {kind} shim, found {pids}")
        shim = pids[0]
        res = {"shim": smaps_rollup(shim)}
        if kind == "tern":
            res["guest_ram_rss"] = guest_ram_rss(shim, guest_mib * MiB)
            res["rss_outside_guest_ram"] = res["shim"]["rss"] - res["guest_ram_rss"]
            res["total"] = res["shim"]
        else:
            procs = [smaps_rollup(p) for p in child_pids(shim) if Path(f"/proc/{p}").exists()]
            res["container_procs"] = procs
            res["total"] = {k: res["shim"][k] + sum(p.get(k, 0) for p in procs) for k in ("rss", "pss")}
        return res
    finally:
        c.ctr(["task", "kill", "--signal", "SIGKILL", name], 60)
        for _ in range(100):
            if c.ctr(["task", "delete", name], 60).returncode == 0:
                break
            time.sleep(0.3)
        c.ctr(["container", "delete", name], 60)


# ----------------------------------------------------------------------------- report


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def render(res: dict[str, Any]) -> str:
    s = res["summary"]

    def f(v: float | None, unit: str = "", nd: int = 0) -> str:
        return "—" if v is None else f"{v:.{nd}f}{unit}"

    def ok(v: bool | None) -> str:
        return "n/a" if v is None else ("met" if v else "missed")

    lines = [
        "# tern vs runc through containerd",
        "",
        f"{res['when']} · {res['host']} · containerd {res['containerd']} · runc {res['runc']} · "
        f"{res['args']['runs']} start runs per runtime (+1 warm-up), medians · guest {res['args']['memory']} MiB",
        "",
        "Inside the nested runner everything is emulated: compare the ratios, not the times.",
        "",
        "| what | tern | runc | tern / runc | target |",
        "|---|---|---|---|---|",
        f"| `ctr run --rm IMAGE true`, end to end (median) | {f(s['start_ms']['tern'], ' ms')} | "
        f"{f(s['start_ms']['runc'], ' ms')} | {f(s['start_ratio'], '×', 2)} | ≤ {TARGET_START_RATIO:g}× "
        f"({ok(s['start_ok'])}) |",
        f"| stdout, {res['args']['stdout_mib']} MiB of `head -c … /dev/zero` via ctr (first byte → EOF) | "
        f"{f(s['stdout_mib_s']['tern'], ' MiB/s', 1)} | {f(s['stdout_mib_s']['runc'], ' MiB/s', 1)} | "
        f"{f(s['stdout_ratio'], '×', 2)} | ≥ {TARGET_STDOUT_RATIO:g}× ({ok(s['stdout_ok'])}) |",
        f"| host memory per sandbox, RSS / PSS (tern: the shim = VMM; runc: shim + container) | "
        f"{f(s['mem_mib']['tern_rss'], '', 1)} / {f(s['mem_mib']['tern_pss'], ' MiB', 1)} | "
        f"{f(s['mem_mib']['runc_rss'], '', 1)} / {f(s['mem_mib']['runc_pss'], ' MiB', 1)} | "
        f"{f(s['mem_ratio_pss'], '×', 1)} (PSS) | — |",
        f"| of which tern's RSS outside guest RAM | {f(s['mem_mib']['tern_outside_guest'], ' MiB', 1)} | | | |",
        "",
        "Start times, ms: " + "; ".join(
            f"{k}: {', '.join(f'{x * 1000:.0f}' for x in res['start'][k])}" for k in res["start"]),
    ]
    if res["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in res["errors"]]]
    return "\n".join(lines) + "\n"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="start runs per runtime (5)")
    ap.add_argument("--stdout-mib", type=int, default=1024, help="stdout volume, MiB (1024)")
    ap.add_argument("--memory", type=int, default=256, help="tern guest memory, MiB, as configured (256)")
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds before the memory sample (3)")
    ap.add_argument("--timeout", type=float, default=240, help="per start run, s (240)")
    ap.add_argument("--stdout-timeout", type=float, default=1800, help="per stdout run, s (1800)")
    ap.add_argument("--bin-dir", type=Path, default=REPO / "target/release")
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests/bench/results")
    args = ap.parse_args(argv)
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            log(f"{tool} not found (make deps installs Debian's containerd and runc)")
            return 2
    if not (args.bin_dir / SHIM_BIN["tern"]).exists():
        log(f"{args.bin_dir / SHIM_BIN['tern']} missing: run `make build`")
        return 2

    res: dict[str, Any] = {
        "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": os.uname().nodename, "containerd": tool_version(["containerd", "--version"]).split()[-1],
        "runc": tool_version(["runc", "--version"]).split()[-1], "args": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()},
        "start": {"tern": [], "runc": []}, "stdout": {}, "memory": {}, "errors": [],
    }
    c = Containerd(args.bin_dir)
    try:
        archive = build_image(c.dir)
        r = c.ctr(["images", "import", "--snapshotter", "native", str(archive)], 300)
        if r.returncode != 0:
            raise RuntimeError(f"image import failed: {r.stderr.decode(errors='replace')}")
        # Start: one warm-up each, then interleaved runs.
        for i in range(args.runs + 1):
            for kind in RUNTIMES:
                try:
                    dt = measure_start(c, kind, f"start-{kind}-{i}", args.timeout)
                    log(f"start {kind} #{i}: {dt * 1000:.0f} ms{' (warm-up)' if i == 0 else ''}")
                    if i > 0:
                        res["start"][kind].append(dt)
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    res["errors"].append(f"start {kind} #{i}: {e}")
                    log(res["errors"][-1])
        for kind in RUNTIMES:
            try:
                res["stdout"][kind] = measure_stdout(c, kind, f"stdout-{kind}", args.stdout_mib * MiB,
                                                     args.stdout_timeout)
                log(f"stdout {kind}: {res['stdout'][kind]}")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"stdout {kind}: {e}")
                log(res["errors"][-1])
        for kind in RUNTIMES:
            try:
                res["memory"][kind] = measure_memory(c, kind, f"mem-{kind}", args.memory, args.settle, args.timeout)
                log(f"memory {kind}: {res['memory'][kind]}")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"memory {kind}: {e}")
                log(res["errors"][-1])
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"setup: {e}\n{c.logs()}")
        log(res["errors"][-1])
    finally:
        c.close()

    st = {k: med(v) for k, v in res["start"].items()}
    start_ms = {k: (v * 1000 if v is not None else None) for k, v in st.items()}
    thr = {k: res["stdout"].get(k, {}).get("mib_per_s") for k in RUNTIMES}
    mem = res["memory"]

    def mib(kind: str, key: str) -> float | None:
        v = mem.get(kind, {}).get("total", {}).get(key)
        return v / MiB if v is not None else None

    start_ratio = st["tern"] / st["runc"] if st["tern"] and st["runc"] else None
    stdout_ratio = thr["tern"] / thr["runc"] if thr["tern"] and thr["runc"] else None
    res["summary"] = {
        "start_ms": start_ms, "start_ratio": start_ratio,
        "start_ok": None if start_ratio is None else start_ratio <= TARGET_START_RATIO,
        "stdout_mib_s": thr, "stdout_ratio": stdout_ratio,
        "stdout_ok": None if stdout_ratio is None else stdout_ratio >= TARGET_STDOUT_RATIO,
        "mem_mib": {"tern_rss": mib("tern", "rss"), "tern_pss": mib("tern", "pss"),
                    "runc_rss": mib("runc", "rss"), "runc_pss": mib("runc", "pss"),
                    "tern_outside_guest": (mem["tern"]["rss_outside_guest_ram"] / MiB) if "tern" in mem else None},
        "mem_ratio_pss": (mib("tern", "pss") / mib("runc", "pss")) if mib("tern", "pss") and mib("runc", "pss")
        else None,
    }
    md = render(res)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "containerd.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out_dir / "containerd.md").write_text(md)
    print(md, flush=True)
    measured = all(res["start"][k] for k in RUNTIMES)
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
