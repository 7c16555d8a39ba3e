#!/usr/bin/env bash
# make bench: tern vs QEMU microvm (boot -> agent ready, VMM memory overhead), all
# measurements in ONE tests/nested-runner boot (on a host whose KVM boots Linux the
# runner just runs the harness directly). Arguments go to bench.py, e.g.
#   tests/bench/run.sh --runs 3          quick run
#   tests/bench/run.sh --systems qemu    QEMU only
#   tests/bench/run.sh --selftest        harness self-test (no KVM, no runner)
# Results: tests/bench/results/{boot,fs,net,watch_latency,containerd,cri}.{md,json} (+ boot.svg),
# metrics_scrape.md.
#   TERN_BENCH_TIMEOUT=S        runner time limit (default 4200)
#   TERN_BENCH_NET=0            leave out the network benchmark (tests/bench/net_bench.py:
#                               tern vs QEMU vs runc, TCP throughput and latency); its arguments
#                               go in TERN_NET_BENCH_ARGS (more on each step below)
# QEMU gets a vhost-vsock device (as tern has a vsock device) when /dev/vhost-vsock exists
# in the runner; `--qemu-vsock off` leaves it out (the agent prints its marker either way).
set -euo pipefail
cd "$(dirname "$0")/../.."

# Python 3.11+, stdlib only; resolved on the host to a real path (pyenv shims need an
# environment the runner does not pass on).
py=
for c in "${PYTHON:-}" python3 python3.11 /usr/bin/python3; do
	[ -n "$c" ] && command -v "$c" >/dev/null || continue
	if p=$("$c" -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null); then
		py=$p
		break
	fi
done
[ -n "$py" ] || { echo "bench: need Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }

# the `make build` artifacts bench.py uses unless --tern/--kernel/--initrd override them
declare -A need=([tern]=target/release/tern [kernel]=target/release/tern-vmlinux
	[initrd]=target/release/tern-initramfs.cpio)
for a in "$@"; do
	case $a in
	--selftest | -h | --help) exec "$py" tests/bench/bench.py "$@" ;;
	--tern | --tern=* | --kernel | --kernel=* | --initrd | --initrd=*)
		a=${a#--}
		unset "need[${a%%=*}]"
		;;
	esac
done

missing=()
for f in "${need[@]}"; do
	[ -e "$f" ] || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "bench: missing ${missing[*]} — run \`make build\` first" >&2
	exit 2
fi
command -v qemu-system-x86_64 >/dev/null || {
	echo "bench: qemu-system-x86_64 not found — run \`make deps\` (package qemu-system-x86)" >&2
	exit 2
}

# Then, in the same runner boot, the virtio-fs benchmark (tests/bench/fs_bench.py: tern's
# built-in device vs QEMU + virtiofsd vs QEMU + `tern fs-serve`; results/fs.{md,json}).
# virtiofsd is built on the host first (the runner's / is read-only) and cached under
# $TERN_CACHE/bin. TERN_FS_BENCH_ARGS goes to fs_bench.py (e.g. "--size 1024 --files 10000");
# TERN_BENCH_FS=0 leaves it out.
fs_cmd=true
if [ "${TERN_BENCH_FS:-1}" != 0 ]; then
	"$py" tests/bench/fs_bench.py --prepare
	fs_cmd="\"\$0\" tests/bench/fs_bench.py ${TERN_FS_BENCH_ARGS:-}"
fi

# Then the network benchmark (tests/bench/net_bench.py: TCP throughput host→guest and
# guest→host, 10 s each, and round-trip latency p50/p99, through tern's virtio-net device
# (`tern boot --netns`) vs QEMU microvm's user-space virtio-net (tap, vhost=off) vs a runc
# container, each in its own netns behind a veth; results/net.{md,json}; about 20 minutes in
# the runner, mostly the 3 x 20,000 round trips per system). The static tern-netperf and the
# bench initramfs (target/release/tern-netbench.cpio) are built on the host first.
# TERN_NET_BENCH_ARGS goes to net_bench.py (e.g. "--runs 1 --seconds 5 --count 5000");
# TERN_BENCH_NET=0 leaves it out.
net_cmd=true
if [ "${TERN_BENCH_NET:-1}" != 0 ]; then
	"$py" tests/bench/net_bench.py --prepare
	net_cmd="\"\$0\" tests/bench/net_bench.py ${TERN_NET_BENCH_ARGS:-}"
fi

# Then the container benchmark through a real containerd (tests/bench/containerd_bench.py:
# tern's shim vs runc — `ctr run --rm IMAGE true` start, 1 GiB of stdout, host memory per
# sandbox; results/containerd.{md,json}). TERN_CONTAINERD_BENCH_ARGS goes to it (e.g.
# "--runs 3 --stdout-mib 256"); TERN_BENCH_CONTAINERD=0 leaves it out.
ctrd_cmd=true
if [ "${TERN_BENCH_CONTAINERD:-1}" != 0 ]; then
	ctrd_cmd="\"\$0\" tests/bench/containerd_bench.py ${TERN_CONTAINERD_BENCH_ARGS:-}"
fi

# Then N pods (default 10) started concurrently through containerd's CRI plugin, tern vs runc
# (tests/bench/cri_bench.sh; results/cri.{md,json}; about 5 minutes in the runner).
# TERN_CRI_BENCH_PODS=N sets N; TERN_BENCH_CRI=0 leaves it out.
cri_cmd=true
if [ "${TERN_BENCH_CRI:-1}" != 0 ]; then
	cri_bin=$(tests/bench/cri_bench.sh --build-only)
	cri_cmd="$(printf %q "$cri_bin") --ignored --exact cri_bench_concurrent_pods --nocapture --test-threads=1"
fi

# Then the metrics scrape cost: `tern monitor` over 1 and 10 real sandboxes under the harness's
# containerd, against one shim's own answer (the ignored test `metrics_scrape_bench` in
# tests/tests/metrics.rs; results/metrics_scrape.md). TERN_BENCH_METRICS=0 leaves it out.
metrics_cmd=true
if [ "${TERN_BENCH_METRICS:-1}" != 0 ]; then
	metrics_bin=$(tests/bench/test_binary.sh metrics)
	metrics_cmd="$(printf %q "$metrics_bin") --ignored --exact metrics_scrape_bench --nocapture --test-threads=1"
fi

# Then the watchable-mount latency benchmark (event vs poll mode) in the same runner boot.
exec tests/nested-runner --timeout "${TERN_BENCH_TIMEOUT:-4200}" -- \
	bash -c '"$0" tests/bench/bench.py "$@" && "$0" tests/bench/watch_latency.py && '"$fs_cmd"' && '"$net_cmd"' && '"$ctrd_cmd"' && '"$cri_cmd"' && '"$metrics_cmd" "$py" "$@"
