#!/usr/bin/env bash
# make bench: tern vs QEMU microvm (boot -> agent ready, VMM memory overhead), all
# measurements in ONE tests/nested-runner boot (on a host whose KVM boots Linux the
# runner just runs the harness directly). Arguments go to bench.py, e.g.
#   tests/bench/run.sh --runs 3          quick run
#   tests/bench/run.sh --systems qemu    QEMU only
#   tests/bench/run.sh --selftest        harness self-test (no KVM, no runner)
# Results: tests/bench/results/boot.{md,svg,json}.
#   TERN_BENCH_TIMEOUT=S        runner time limit (default 3000)
#   TERN_BENCH_VHOST_VSOCK=0    do not load vhost_vsock in the runner (QEMU then gets no
#                               vsock device; by default it gets one, as tern has one)
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

for a in "$@"; do
	if [ "$a" = --selftest ] || [ "$a" = -h ] || [ "$a" = --help ]; then
		exec "$py" tests/bench/bench.py "$@"
	fi
done

missing=()
for f in target/release/tern target/release/tern-vmlinux target/release/tern-initramfs.cpio; do
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

if [ "${TERN_BENCH_VHOST_VSOCK:-1}" != 0 ]; then
	export TERN_RUNNER_MODULES="${TERN_RUNNER_MODULES:+$TERN_RUNNER_MODULES }vhost_vsock"
fi
exec tests/nested-runner --timeout "${TERN_BENCH_TIMEOUT:-3000}" -- "$py" tests/bench/bench.py "$@"
