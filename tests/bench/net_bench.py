#!/usr/bin/env python3
"""tern network benchmark: TCP throughput both ways and round-trip latency, host to guest.

The guest side is one of

  tern  tern's virtio-net device (`tern boot --netns`, the VMM alone, no agent)
  qemu  QEMU `-M microvm,acpi=off` + `virtio-net-device` on a tap (`vhost=off`: user space)
  runc  a runc container (`runc run`, no VM: the floor)

Every system sits in a fresh network namespace behind the same veth pair: the host end keeps
10.X.0.1/24 in the root namespace, the pod end is `eth0` with 10.X.0.2/24, MTU 1500 (a
different X per system). tern connects its tap to eth0 itself (tc ingress + u32 match-all +
mirred redirect both ways, Kata's "tcfilter" model); for QEMU this script makes the same
wiring with ip/tc around a tap `qtap0`; the runc container uses eth0 directly. The guest NIC
takes eth0's MAC and the address 10.X.0.2, so the host client talks to 10.X.0.2 in all three.

tern and QEMU boot the same kernel and the same initramfs: `make build`'s tern-initramfs.cpio
with an appended archive holding /bin/tern-netperf (tests/netperf, static) and /netbench-init,
selected by `rdinit=/netbench-init` and configured by `netbench.*` kernel parameters. The init
configures the NIC, starts `tern-netperf server`, prints @@NETBENCH-READY on the serial console
and reboots when the server is told to stop. The runc container runs the same binary.

Per run and system (one fresh boot or container, one fresh namespace; systems interleaved):
`send` (host → guest) and `recv` (guest → host) for --seconds each, then --count request/
response round trips of --size bytes (TCP_NODELAY, 100 uncounted first). Throughput is measured
on the receiving side; the report gives medians over runs. Ratios: tern / QEMU (targets:
throughput >= 1.0x, latency <= 1.0x) and tern / runc. Writes results/net.md and net.json.

  net_bench.py --prepare     host side, before the runner: builds the static tern-netperf and
                             target/release/tern-netbench.cpio (needs `make build` first)
  net_bench.py [options]     as root, where KVM boots Linux (inside tests/nested-runner;
                             tests/bench/run.sh does both)
  net_bench.py --selftest    parsing and report logic, no KVM, no root

Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
TOOL_TARGET = "x86_64-unknown-linux-gnu"
STATIC_NETPERF = REPO / f"target/{TOOL_TARGET}/release/tern-netperf"
BASE_INITRD = REPO / "target/release/tern-initramfs.cpio"
BENCH_INITRD = REPO / "target/release/tern-netbench.cpio"
SYSTEMS = ("tern", "qemu", "runc")
LABEL = {"tern": "tern", "qemu": "QEMU", "runc": "runc"}
# 10.X.0.0/24 per system
SUBNET = {"tern": 231, "qemu": 232, "runc": 233}
MTU = 1500
READY = "@@NETBENCH-READY"
FAIL = "@@NETBENCH-FAIL"
NIC_LINE = "@@NETBENCH-NIC"
RUNC_READY = "tern-netperf: listening on"
# The tern guest's defaults (vmm/src/boot/cmdline.rs) with a triple-fault reboot, which
# QEMU's -no-reboot turns into an exit.
QEMU_CMDLINE = ("console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1 "
                "i8042.noaux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check")
# metric -> (label, unit, higher is better, target for tern / QEMU)
METRICS: dict[str, tuple[str, str, bool, float]] = {
    "to_guest_gbit_s": ("TCP throughput host → guest", "Gbit/s", True, 1.0),
    "from_guest_gbit_s": ("TCP throughput guest → host", "Gbit/s", True, 1.0),
    "rr_p50_us": ("TCP round trip p50", "µs", False, 1.0),
    "rr_p99_us": ("TCP round trip p99", "µs", False, 1.0),
}
# After `stop`, how long the guest may take to reboot (and the VMM to exit) before it is killed.
STOP_GRACE_S = 30

INIT_SCRIPT = r"""#!/bin/sh
# tern network benchmark guest (tests/bench/net_bench.py): configure the NIC from the netbench.*
# kernel parameters, serve tern-netperf, reboot once the server has been told to stop.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
fail() { echo "@@NETBENCH-FAIL $*"; sleep 1; reboot -f; }
ip=; mtu=1500; port=5201
for arg in $(cat /proc/cmdline); do
	case $arg in
	netbench.ip=*) ip=${arg#*=} ;;
	netbench.mtu=*) mtu=${arg#*=} ;;
	netbench.port=*) port=${arg#*=} ;;
	esac
done
[ -n "$ip" ] || fail "no netbench.ip= on the kernel command line"
ip link set dev lo up || fail "lo up"
nic=
for d in /sys/class/net/*; do
	[ "${d##*/}" = lo ] || { nic=${d##*/}; break; }
done
[ -n "$nic" ] || fail "no network interface besides lo"
ip link set dev "$nic" mtu "$mtu" || fail "mtu $mtu on $nic"
ip addr add "$ip" dev "$nic" || fail "address $ip on $nic"
ip link set dev "$nic" up || fail "$nic up"
echo "@@NETBENCH-NIC name=$nic mac=$(cat /sys/class/net/$nic/address) mtu=$(cat /sys/class/net/$nic/mtu) features=$(cat /sys/class/net/$nic/device/features 2>/dev/null)"
/bin/tern-netperf server "$port" &
server=$!
listening=":$(printf %04X "$port") 00000000:0000 0A"
tries=0
until grep -q "$listening" /proc/net/tcp; do
	kill -0 "$server" 2>/dev/null || fail "tern-netperf server exited"
	tries=$((tries + 1))
	[ "$tries" -lt 300 ] || fail "tern-netperf server not listening on $port"
	sleep 0.1
done
echo "@@NETBENCH-READY ip=$ip port=$port"
wait "$server"
echo "@@NETBENCH-DONE status=$?"
reboot -f
"""


def log(msg: str) -> None:
    print(f"net-bench: {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    """Run a setup command; its stdout. Raises RuntimeError with its stderr on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout


# ---------------------------------------------------------------- host preparation


def prepare() -> int:
    """Host side (outside the runner, where target/ is built): the static tool and the bench
    initramfs (make build's initramfs + an appended cpio with the tool and /netbench-init)."""
    for tool in ("ip", "tc", "cpio", "strip"):
        if shutil.which(tool) is None:
            log(f"{tool} not found (packages iproute2, cpio, binutils)")
            return 2
    if shutil.which("runc") is None:
        log("runc not found: the runc system will fail (`make deps` installs it)")
    if not BASE_INITRD.is_file():
        log(f"{BASE_INITRD} missing: run `make build` first")
        return 2
    log("building the static tern-netperf")
    env = dict(os.environ, RUSTFLAGS="-C target-feature=+crt-static")
    subprocess.run(["cargo", "build", "--release", "-p", "tern-netperf", "--target", TOOL_TARGET],
                   cwd=REPO, env=env, check=True)
    if b"dynamically linked" in subprocess.run(["file", "-L", str(STATIC_NETPERF)], capture_output=True).stdout:
        log(f"{STATIC_NETPERF} is dynamically linked; the guest has no libc")
        return 1
    with tempfile.TemporaryDirectory(prefix="tern-netbench-") as tmp:
        stage = Path(tmp) / "root"
        (stage / "bin").mkdir(parents=True)
        subprocess.run(["strip", "-o", str(stage / "bin/tern-netperf"), str(STATIC_NETPERF)], check=True)
        init = stage / "netbench-init"
        init.write_text(INIT_SCRIPT)
        (stage / "bin/tern-netperf").chmod(0o755)
        init.chmod(0o755)
        # No directory entries: bin/ exists in the base archive, which the kernel unpacks first.
        extra = Path(tmp) / "extra.cpio"
        with open(extra, "wb") as f:
            subprocess.run(["cpio", "--create", "--format=newc", "--owner=0:0", "--reproducible", "--quiet"],
                           cwd=stage, input=b"bin/tern-netperf\nnetbench-init\n", stdout=f, check=True)
        tmp_out = BENCH_INITRD.with_suffix(".tmp")
        with open(tmp_out, "wb") as out:
            for part in (BASE_INITRD, extra):
                out.write(part.read_bytes())
        tmp_out.replace(BENCH_INITRD)
    log(f"{BENCH_INITRD}: {BENCH_INITRD.stat().st_size} bytes")
    return 0


# ---------------------------------------------------------------- parsing


def parse_result_line(stdout: str) -> dict[str, Any]:
    """The JSON line a `tern-netperf client` printed."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the client's output {stdout[-200:]!r}")


def console_failure(text: str) -> str | None:
    """The reason of a @@NETBENCH-FAIL line, if the guest printed one."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(FAIL):
            return line[len(FAIL):].strip() or "no reason given"
    return None


def parse_nic_line(text: str) -> dict[str, str] | None:
    """`@@NETBENCH-NIC name=eth0 mac=... mtu=1500 features=0101...` as a dict."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(NIC_LINE):
            return dict(p.split("=", 1) for p in line[len(NIC_LINE):].split() if "=" in p)
    return None


def virtio_features(bits: str) -> list[int]:
    """Feature bit numbers from a virtio device's sysfs `features` string ('0'/'1' per bit)."""
    return [i for i, c in enumerate(bits) if c == "1"]


def to_metrics(raw: dict[str, dict]) -> dict[str, float | None]:
    def get(test: str, key: str) -> float | None:
        v = raw.get(test, {}).get(key)
        return float(v) if v is not None else None

    return {
        "to_guest_gbit_s": get("send", "gbit_s"),
        "from_guest_gbit_s": get("recv", "gbit_s"),
        "rr_p50_us": get("rr", "p50_us"),
        "rr_p99_us": get("rr", "p99_us"),
        "rr_mean_us": get("rr", "mean_us"),
    }


# ---------------------------------------------------------------- cleanup


class Cleanup:
    """Undo actions (idempotent callables) that must run even on failure, ctrl-C or SIGTERM:
    `with` blocks run theirs; whatever is left runs at exit."""

    def __init__(self, report: Callable[[str], None] = log) -> None:
        self.pending: dict[int, tuple[str, Callable[[], None]]] = {}
        self.next = 0
        self.report = report

    def add(self, what: str, undo: Callable[[], None]) -> int:
        self.next += 1
        self.pending[self.next] = (what, undo)
        return self.next

    def run(self, key: int) -> None:
        what, undo = self.pending.pop(key, ("", None))
        if undo is None:
            return
        try:
            undo()
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            self.report(f"cleanup of {what} failed: {e}")

    def run_all(self) -> None:
        for key in sorted(self.pending, reverse=True):
            self.run(key)


CLEANUP = Cleanup()
atexit.register(CLEANUP.run_all)


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def kill_process(p: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM to its process group, SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- topology


@dataclass
class PodNetns:
    """A fresh netns with `eth0` (10.X.0.2/24) whose veth peer stays in the root netns (10.X.0.1/24)."""

    name: str
    host_if: str
    subnet: int

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def gateway(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def pod_ip(self) -> str:
        return f"10.{self.subnet}.0.2"

    def create(self) -> None:
        mtu = str(MTU)
        sh("ip", "netns", "add", self.name)
        # `name` before the host end: a bare first word would be parsed as `address`.
        sh("ip", "link", "add", "name", self.host_if, "mtu", mtu, "type", "veth",
           "peer", "name", "eth0", "mtu", mtu, "netns", self.name)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.name, "addr", "add", f"{self.pod_ip}/24", "dev", "eth0")
        sh("ip", "-n", self.name, "link", "set", "eth0", "up")
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    def mac(self) -> str:
        link = sh("ip", "-n", self.name, "-o", "link", "show", "dev", "eth0")
        m = re.search(r"link/ether ([0-9a-f:]{17})", link)
        if not m:
            raise RuntimeError(f"no MAC for eth0 in {link!r}")
        return m.group(1)

    def tern_leftovers(self) -> list[str]:
        """Taps and ingress qdiscs left in the namespace (after tern exited cleanly there
        should be none: its network's Drop removes them)."""
        links = sh("ip", "-n", self.name, "-o", "link", "show", check=False)
        qdiscs = sh("tc", "-n", self.name, "qdisc", "show", check=False)
        return ([f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if "_tern" in ln]
                + [f"qdisc {ln.strip()}" for ln in qdiscs.splitlines() if "ingress" in ln])

    def remove(self) -> None:
        # The host end first: deleting it deletes the pair at once (a netns goes asynchronously).
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)


def wire_tap(netns: str, tap: str) -> None:
    """QEMU's side of the tcfilter model: a tap next to eth0, every frame redirected both ways."""
    mtu = str(MTU)
    sh("ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
    sh("ip", "-n", netns, "link", "set", tap, "mtu", mtu, "up")
    for src, dst in (("eth0", tap), (tap, "eth0")):
        sh("tc", "-n", netns, "qdisc", "add", "dev", src, "ingress")
        sh("tc", "-n", netns, "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all",
           "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dst)


def remove_stale_namespaces() -> None:
    """Namespaces a killed earlier run left (`tnb-<pid>-...` with that pid gone)."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"tnb-(\d+)-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            log(f"removing stale netns {name}")
            sh("ip", "netns", "del", name, check=False)


def check_subnets(systems: list[str]) -> None:
    routes = sh("ip", "-4", "route", "show")
    for s in systems:
        prefix = f"10.{SUBNET[s]}."
        clash = [r for r in routes.splitlines() if r.startswith(prefix)]
        if clash:
            raise RuntimeError(f"10.{SUBNET[s]}.0.0/24 is already routed on this host: {clash[0]}")


# ---------------------------------------------------------------- running systems


class Instance:
    """One running VMM or container: its process, its console log, how to stop it."""

    def __init__(self, proc: subprocess.Popen, console: Path, ready: str,
                 pre_kill: Callable[[], None] | None = None, post_kill: Callable[[], None] | None = None):
        self.proc = proc
        self.console = console
        self.ready = ready
        # pre_kill: a gentler way to end it than signals (runc: kill the container's init,
        # which as PID 1 of its namespace ignores the SIGTERM runc would forward); post_kill:
        # what is left to remove once the process is gone.
        self.pre_kill = pre_kill
        self.post_kill = post_kill
        self.key = CLEANUP.add(f"process {proc.pid}", self.close)

    def text(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            reason = console_failure(text)
            if reason:
                raise RuntimeError(f"guest init failed: {reason}")
            if self.ready in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[0]} exited ({self.proc.returncode}) before {self.ready}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {self.ready} within {timeout:g} s")
            time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.pre_kill is not None and self.proc.poll() is None:
            self.pre_kill()
            self.wait_exit(10)
        kill_process(self.proc)
        if self.post_kill is not None:
            self.post_kill()

    def finish(self) -> None:
        CLEANUP.run(self.key)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, tern: Path, kernel: Path, initrd: Path, netperf: Path):
        self.a = args
        self.work = work
        self.tern = tern
        self.kernel = kernel
        self.initrd = initrd
        self.netperf = netperf
        self.runc_root = work / "runc-root"

    def guest_params(self, net: PodNetns) -> str:
        return f"rdinit=/netbench-init netbench.ip={net.pod_ip}/24 netbench.mtu={MTU} netbench.port={self.a.port}"

    def spawn(self, cmd: list[str], console: Path) -> subprocess.Popen:
        with open(console, "wb") as out:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.work)

    def start_tern(self, net: PodNetns, root: Path) -> Instance:
        cmd = [str(self.tern), "boot", "--kernel", str(self.kernel), "--initrd", str(self.initrd),
               "--vcpus", "1", "--memory", str(self.a.memory), "--netns", net.path,
               "--cmdline", self.guest_params(net), "--timeout", str(int(self.a.limit))]
        console = root / "console.log"
        return Instance(self.spawn(cmd, console), console, READY)

    def start_qemu(self, net: PodNetns, root: Path) -> Instance:
        tap = "qtap0"
        wire_tap(net.name, tap)
        # virtio 1.x over MMIO as tern's device (QEMU's virtio-mmio defaults to the legacy 0.9 layout).
        cmd = ["ip", "netns", "exec", net.name,
               self.a.qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-smp", "1",
               "-m", str(self.a.memory), "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", "stdio", "-no-reboot",
               "-global", "virtio-mmio.force-legacy=false",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
               "-device", f"virtio-net-device,netdev=n0,mac={net.mac()}",
               "-kernel", str(self.kernel), "-initrd", str(self.initrd),
               "-append", f"{QEMU_CMDLINE} {self.guest_params(net)}"]
        console = root / "console.log"
        return Instance(self.spawn(cmd, console), console, READY)

    def start_runc(self, net: PodNetns, root: Path) -> Instance:
        bundle = root / "bundle"
        rootfs = bundle / "rootfs"
        for d in ("bin", "proc", "dev", "sys", "tmp"):
            (rootfs / d).mkdir(parents=True)
        shutil.copy2(self.netperf, rootfs / "bin/tern-netperf")
        sh(self.a.runc, "spec", "--bundle", str(bundle))
        spec_path = bundle / "config.json"
        spec = json.loads(spec_path.read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["/bin/tern-netperf", "server", str(self.a.port)]
        spec["root"] = {"path": "rootfs", "readonly": True}
        namespaces = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
        spec["linux"]["namespaces"] = namespaces + [{"type": "network", "path": net.path}]
        spec_path.write_text(json.dumps(spec, indent=2))
        cid = f"tern-netbench-{os.getpid()}-{root.name}"
        runc = [self.a.runc, "--root", str(self.runc_root)]

        console = root / "console.log"
        proc = self.spawn([*runc, "run", "--bundle", str(bundle), cid], console)
        return Instance(proc, console, RUNC_READY,
                        pre_kill=lambda: sh(*runc, "kill", cid, "KILL", check=False),
                        post_kill=lambda: sh(*runc, "delete", "--force", cid, check=False))

    def client(self, ip: str, *test: str, timeout: float) -> dict[str, Any]:
        cmd = [str(self.netperf), "client", ip, str(self.a.port), *test, "--connect-timeout", "10"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"no result within {timeout:g} s") from None
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip() or f"exit status {r.returncode}")
        return parse_result_line(r.stdout)

    def run_once(self, system: str, index: int) -> dict[str, Any]:
        """One boot (or container) of `system` in a fresh netns: send, recv, rr, stop."""
        root = self.work / f"{system}-{index}"
        root.mkdir()
        pid = os.getpid()
        net = PodNetns(name=f"tnb-{pid}-{system}{index}", host_if=f"tnb{pid % 100000}{system[0]}{index}",
                       subnet=SUBNET[system])
        result: dict[str, Any] = {"system": system, "run": index, "ok": False, "raw": {}, "errors": []}
        errors: list[str] = result["errors"]
        started = time.monotonic()
        net_key = CLEANUP.add(f"netns {net.name}", net.remove)
        inst: Instance | None = None
        try:
            net.create()
            inst = {"tern": self.start_tern, "qemu": self.start_qemu, "runc": self.start_runc}[system](net, root)
            inst.wait_ready(self.a.boot_timeout)
            result["ready_s"] = time.monotonic() - started
            nic = parse_nic_line(inst.text())
            if nic is not None:
                nic["feature_bits"] = virtio_features(nic.get("features", ""))
                result["guest_nic"] = nic
            secs = str(self.a.seconds)
            limit = self.a.seconds + 60
            # The round-trip limit: generous, a nested guest's round trip can take milliseconds.
            rr_limit = 120 + self.a.count * 0.01
            for test, args, timeout in (("send", ("send", secs), limit), ("recv", ("recv", secs), limit),
                                        ("rr", ("rr", "--count", str(self.a.count), "--size", str(self.a.size)),
                                         rr_limit)):
                try:
                    result["raw"][test] = self.client(net.pod_ip, *args, timeout=timeout)
                except (RuntimeError, ValueError) as e:
                    errors.append(f"{test}: {e}")
            try:
                self.client(net.pod_ip, "stop", timeout=30)
                code = inst.wait_exit(STOP_GRACE_S)
                result["exit_after_stop"] = code
                if code is None:
                    errors.append(f"still running {STOP_GRACE_S} s after stop; killed")
                elif code != 0:
                    errors.append(f"exit status {code} after stop")
                elif system == "tern":
                    result["tern_leftovers"] = net.tern_leftovers()
            except RuntimeError as e:
                errors.append(f"stop: {e}")
        except Exception as e:  # noqa: BLE001 - recorded per run, the bench goes on
            errors.append(str(e))
        finally:
            if inst is not None:
                inst.finish()
                result["console_tail"] = inst.text()[-3000:]
            CLEANUP.run(net_key)
            result["wall_s"] = time.monotonic() - started
        result["metrics"] = to_metrics(result["raw"])
        result["ok"] = not errors
        return result


# ---------------------------------------------------------------- report


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """Medians per system and metric over every run that measured it."""
    keys = list(METRICS) + ["rr_mean_us"]
    return {s: {m: median([r["metrics"].get(m) for r in runs]) for m in keys} for s, runs in results.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict, peer: str) -> dict[str, float | None]:
    return {m: ratio(summary.get("tern", {}).get(m), summary.get(peer, {}).get(m)) for m in METRICS}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:,.0f} {unit}"
    return f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"


def fmt_ratio(r: float | None, bold: bool = False) -> str:
    if r is None:
        return "n/a"
    return f"**{r:.2f}x**" if bold else f"{r:.2f}x"


def target_met(metric: str, r: float | None) -> bool | None:
    if r is None:
        return None
    _, _, higher, target = METRICS[metric]
    return r >= target if higher else r <= target


def render(summary: dict, results: dict, args: argparse.Namespace, facts: dict) -> tuple[str, list[str]]:
    systems = [s for s in SYSTEMS if s in summary]
    vs_qemu, vs_runc = ratios(summary, "qemu"), ratios(summary, "runc")
    lines = [
        "# Network: tern virtio-net vs QEMU virtio-net (user space) vs runc",
        "",
        f"Host ↔ guest TCP over a veth into a fresh network namespace per run, one {facts['where']} run on "
        f"{facts['date']}. Throughput: {args.seconds:g} s per direction, measured by the receiver; "
        f"latency: {args.count:,} round trips of {args.size} B (TCP_NODELAY). Medians of {args.runs} run(s) "
        "per system (each a fresh boot or container, systems interleaved). Ratios are tern / peer: "
        "for throughput higher is better, for latency lower is better.",
        "",
    ]
    head = ["metric", *(LABEL[s] for s in systems), "tern / QEMU", "target", "tern / runc"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts = []
    for m, (label, unit, higher, target) in METRICS.items():
        ok = target_met(m, vs_qemu[m])
        want = f"{'>=' if higher else '<='} {target:.1f}x"
        verdicts.append(f"{label}: {fmt_ratio(vs_qemu[m])} vs QEMU "
                        f"({'no data' if ok is None else ('target ' + want + (' met' if ok else ' missed'))})")
        row = [f"{label}{'' if higher else f' ({args.size} B)'}", *(fmt(summary[s][m], unit) for s in systems),
               fmt_ratio(vs_qemu[m], bold=True), want, fmt_ratio(vs_runc[m])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Setup: " + facts["setup"], ""]
    failed = [(s, r) for s, runs in results.items() for r in runs if not r["ok"]]
    if failed:
        lines.append("Failed or incomplete runs:")
        for s, r in failed:
            lines.append(f"- {LABEL[s]} run {r['run'] + 1}: " + "; ".join(r["errors"]))
        lines.append("")
    lines.append("Everything inside the nested runner is emulated: compare ratios, not absolute numbers.")
    return "\n".join(lines) + "\n", verdicts


def first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return f"{cmd[0]} ?"
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else f"{cmd[0]} ?"


def facts_for(args: argparse.Namespace, systems: list[str]) -> dict[str, str]:
    inside = os.environ.get("TERN_RUNNER_INSIDE") == "1"
    parts = [f"guests: 1 vCPU, {args.memory} MiB, same kernel and initramfs, MTU {MTU}"]
    if "tern" in systems:
        parts.append("tern: `tern boot --netns` (its tap wired to eth0 by tern: tc ingress + u32 + mirred)")
    if "qemu" in systems:
        parts.append(f"QEMU: {first_line([args.qemu, '--version'])}, `-M microvm,acpi=off`, virtio-net-device "
                     "(virtio 1.x MMIO) on a tap wired to eth0 the same way, vhost=off, default offloads")
    if "runc" in systems:
        parts.append(f"runc: {first_line([args.runc, '--version'])}, the tool directly on eth0")
    parts.append("client: tern-netperf on the host, in the root netns")
    return {
        "where": "tests/nested-runner (QEMU TCG outer VM, nested KVM)" if inside else "direct",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": "; ".join(parts) + ".",
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="host side: build the tool and the bench initramfs")
    ap.add_argument("--selftest", action="store_true", help="check parsing/report logic (no KVM)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    ap.add_argument("--runs", type=int, default=3, help="runs per system, interleaved (3)")
    ap.add_argument("--seconds", type=float, default=10, help="each throughput test, s (10)")
    ap.add_argument("--count", type=int, default=20000, help="round trips per run (20000)")
    ap.add_argument("--size", type=int, default=64, help="round-trip message size, bytes (64)")
    ap.add_argument("--memory", type=int, default=512, help="guest memory, MiB (512)")
    ap.add_argument("--port", type=int, default=5201, help="the server's TCP port (5201)")
    ap.add_argument("--boot-timeout", type=float, default=300, help="spawn -> ready limit, s (300)")
    ap.add_argument("--tern", type=Path, default=REPO / "target/release/tern")
    ap.add_argument("--kernel", type=Path, default=REPO / "target/release/tern-vmlinux")
    ap.add_argument("--initrd", type=Path, default=BENCH_INITRD, help="the bench initramfs (from --prepare)")
    ap.add_argument("--netperf", type=Path, default=STATIC_NETPERF, help="static tern-netperf (from --prepare)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runc", default="runc")
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests/bench/results")
    a = ap.parse_args(argv)
    bad = [s for s in a.systems.split(",") if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown system(s) {bad}")
    if a.runs < 1 or a.seconds <= 0 or a.count < 1 or not 1 <= a.size <= 1 << 20:
        ap.error("--runs, --seconds, --count must be positive and --size in [1, 1048576]")
    # Whole-boot limit for `tern boot` (the bench stops it long before).
    a.limit = a.boot_timeout + 2 * a.seconds + a.count * 0.01 + 600
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.selftest:
        return selftest()
    if args.prepare:
        return prepare()
    systems = args.systems.split(",")
    needed = {"--netperf": args.netperf}
    if "tern" in systems or "qemu" in systems:
        needed.update({"--initrd": args.initrd, "--kernel": args.kernel})
    if "tern" in systems:
        needed["--tern"] = args.tern
    missing = [f"{k} {v}" for k, v in needed.items() if not Path(v).exists()]
    if missing:
        log(f"missing {', '.join(missing)}: run `make build` and `net_bench.py --prepare` on the host first")
        return 2
    if os.geteuid() != 0:
        log("needs root (network namespaces, taps, /dev/kvm, runc)")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    remove_stale_namespaces()
    check_subnets(systems)
    results: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="tern-net-bench-") as tmp:
        work = Path(tmp)
        # Snapshots: a concurrent build may replace the binaries while this runs.
        snap = {}
        for name, src in (("tern", args.tern), ("vmlinux", args.kernel), ("initrd.cpio", args.initrd),
                          ("tern-netperf", args.netperf)):
            if Path(src).exists():
                snap[name] = work / name
                shutil.copy2(Path(src).resolve(), snap[name])
        bench = Bench(args, work, snap.get("tern", args.tern), snap.get("vmlinux", args.kernel),
                      snap.get("initrd.cpio", args.initrd), snap["tern-netperf"])
        try:
            for i in range(args.runs):
                for s in systems:
                    log(f"run {i + 1}/{args.runs}: {LABEL[s]} (10.{SUBNET[s]}.0.2, {args.seconds:g} s per "
                        f"direction, {args.count} round trips)")
                    r = bench.run_once(s, i)
                    m = r["metrics"]
                    log("  " + ", ".join(f"{k} {fmt(v, '')}".rstrip() for k, v in m.items())
                        + f" (ready {r.get('ready_s', float('nan')):.1f} s, wall {r['wall_s']:.1f} s)")
                    if not r["ok"]:
                        log("  FAILED: " + "; ".join(r["errors"]) + "\n" + r.get("console_tail", "")[-1500:])
                    if r.get("tern_leftovers"):
                        log(f"  tern left {r['tern_leftovers']} in the namespace")
                    results[s].append(r)
        finally:
            CLEANUP.run_all()
    summary = summarize(results)
    facts = facts_for(args, systems)
    md, verdicts = render(summary, results, args, facts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "net.md").write_text(md)
    doc = {
        "params": {"seconds": args.seconds, "count": args.count, "size": args.size, "runs": args.runs,
                   "memory_mib": args.memory, "mtu": MTU, "systems": systems},
        "facts": facts,
        "summary": summary,
        "ratios": {"tern/qemu": ratios(summary, "qemu"), "tern/runc": ratios(summary, "runc")},
        "targets_vs_qemu": {m: (">=" if h else "<=") + f" {t}" for m, (_, _, h, t) in METRICS.items()},
        "runs": results,
    }
    (args.out_dir / "net.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(md)
    print("tern / QEMU: " + "; ".join(verdicts))
    return 0 if all(any(r["ok"] for r in runs) for runs in results.values()) else 1


def selftest() -> int:
    assert parse_result_line('noise\n{"test":"send","bytes":10,"seconds":1.0,"gbit_s":0.5}\n')["gbit_s"] == 0.5
    try:
        parse_result_line("tern-netperf: listening\n")
    except ValueError:
        pass
    else:
        raise AssertionError("accepted output without a JSON line")
    console = ("[    0.5] junk\r\n@@NETBENCH-NIC name=eth0 mac=02:00:00:00:00:01 mtu=1500 features=0110\r\n"
               "@@NETBENCH-READY ip=10.1.0.2/24 port=5201\r\n")
    assert console_failure(console) is None and READY in console
    assert console_failure("x\n@@NETBENCH-FAIL no network interface besides lo\n") == "no network interface besides lo"
    nic = parse_nic_line(console)
    assert nic == {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": "1500", "features": "0110"}, nic
    assert virtio_features("0110") == [1, 2]
    assert INIT_SCRIPT.startswith("#!/bin/sh\n") and READY in INIT_SCRIPT
    assert FAIL in INIT_SCRIPT and NIC_LINE in INIT_SCRIPT

    def run(send: float | None, recv: float, p50: float, p99: float, ok: bool = True, index: int = 0) -> dict:
        raw = {"recv": {"gbit_s": recv}, "rr": {"p50_us": p50, "p99_us": p99, "mean_us": p50}}
        if send is not None:
            raw["send"] = {"gbit_s": send}
        return {"run": index, "ok": ok, "raw": raw, "metrics": to_metrics(raw), "errors": [] if ok else ["send: boom"]}

    results = {
        "tern": [run(2.0, 4.0, 100, 300), run(4.0, 2.0, 300, 500), run(None, 3.0, 200, 400, ok=False, index=2)],
        "qemu": [run(2.0, 2.0, 400, 800)],
        "runc": [run(8.0, 8.0, 50, 100)],
    }
    summary = summarize(results)
    assert summary["tern"]["to_guest_gbit_s"] == 3.0 and summary["tern"]["from_guest_gbit_s"] == 3.0, summary
    assert summary["tern"]["rr_p50_us"] == 200 and summary["tern"]["rr_p99_us"] == 400, summary
    q = ratios(summary, "qemu")
    assert q["to_guest_gbit_s"] == 1.5 and q["rr_p50_us"] == 0.5, q
    assert target_met("to_guest_gbit_s", 1.5) and target_met("rr_p99_us", 0.5)
    assert target_met("from_guest_gbit_s", 0.9) is False and target_met("rr_p50_us", 1.1) is False
    assert target_met("rr_p50_us", None) is None
    assert ratios({"tern": {"rr_p50_us": 1.0}}, "qemu")["rr_p50_us"] is None
    args = argparse.Namespace(seconds=10.0, count=20000, size=64, runs=3)
    md, verdicts = render(summary, results, args, {"where": "test", "date": "now", "setup": "x"})
    assert "| TCP throughput host → guest | 3.00 Gbit/s | 2.00 Gbit/s | 8.00 Gbit/s | **1.50x** | >= 1.0x | 0.38x |" \
        in md, md
    assert "| TCP round trip p50 (64 B) | 200 µs | 400 µs | 50.0 µs | **0.50x** | <= 1.0x | 4.00x |" in md, md
    assert "tern run 3: send: boom" in md, md
    assert verdicts[0] == "TCP throughput host → guest: 1.50x vs QEMU (target >= 1.0x met)", verdicts
    assert fmt(None, "µs") == "n/a" and fmt(1234.5, "µs") == "1,234 µs"
    # cleanup: every action once, in reverse order, failures logged and passed over
    order: list[str] = []
    reports: list[str] = []
    c = Cleanup(reports.append)
    c.add("a", lambda: order.append("a"))
    k = c.add("b", lambda: order.append("b"))
    c.add("boom", lambda: 1 / 0)
    c.add("c", lambda: order.append("c"))
    c.run(k)
    c.run(k)
    c.run_all()
    c.run_all()
    assert order == ["b", "c", "a"] and reports == ["cleanup of boom failed: division by zero"], (order, reports)
    print("net_bench selftest: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
