#!/usr/bin/env bash
# CRI pod benchmark: N pods (default 10) started concurrently through containerd's CRI plugin,
# tern's runtime handler vs runc, in ONE tests/nested-runner boot. Runs the ignored test
# `cri_bench_concurrent_pods` (tests/tests/cri_bench.rs), which writes
# tests/bench/results/cri.{md,json}.
#   TERN_CRI_BENCH_PODS=N      pods per batch (default 10)
#   TERN_BENCH_TIMEOUT=S       runner time limit (default 2400)
# `--build-only` builds the benchmark binary and prints its path (tests/bench/run.sh runs it
# in its own runner boot). Needs `make build` first (the shim, the guest kernel, the initramfs).
set -euo pipefail
cd "$(dirname "$0")/../.."
for f in target/release/containerd-shim-tern-v2 target/release/tern-vmlinux target/release/tern-initramfs.cpio; do
	[ -e "$f" ] || { echo "cri_bench: missing $f — run \`make build\` first" >&2; exit 2; }
done
bin=$(tests/bench/test_binary.sh cri_bench)
if [ "${1:-}" = --build-only ]; then
	echo "$bin"
	exit 0
fi
export TERN_BIN="$PWD/target/release/tern" TERN_CRI_BENCH_PODS="${TERN_CRI_BENCH_PODS:-10}"
exec tests/nested-runner --timeout "${TERN_BENCH_TIMEOUT:-2400}" -- \
	"$bin" --ignored --exact cri_bench_concurrent_pods --nocapture --test-threads=1
