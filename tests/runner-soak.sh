#!/usr/bin/env bash
# Soak the nested runner: N runner uses in a row, each one outer-VM boot that carries tern's
# VMs under stdout-heavy load (the 50 MiB late-reader test, four VMs at once, 10 MiB through
# stdin, stdin EOF after interactive use), and a tally of how each use ended.
#
# Usage: tests/runner-soak.sh [N]       (N uses, default 10)
#
# tern must be built (`make build`: tern, its guest kernel and initramfs); the test binaries
# are built here as `make test-kvm` builds them. A use ends one of three ways: every test
# passed; the outer VM failed (the runner's exit 125: it hung, oopsed or crashed, see
# tests/README.md); or a test failed. Inside the runner tests/run-test-binary.py reruns a
# guest that never got going once, as in `make test`; such reruns are counted apart. Each
# use's output goes to target/runner-soak/use-<i>.log, one line per use to
# target/runner-soak/tally, and the counts are printed at the end. Exit status: 0 when no use
# failed in either way. One use takes 115–136 s here (the outer VM runs under QEMU TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
uses=${1:-10}
case $uses in '' | *[!0-9]*) echo "usage: $0 [N]" >&2; exit 2 ;; esac

bins=$(tests/kvm-test-bins.sh)
bin_of() { grep "/deps/$1-" <<<"$bins" | head -n 1; }
io=$(bin_of containerd_io) boot=$(bin_of kvm_boot) life=$(bin_of run_lifecycle)
if [ -z "$io" ] || [ -z "$boot" ] || [ -z "$life" ]; then
	echo "runner-soak: the containerd_io, kvm_boot and run_lifecycle test binaries were not built" >&2
	exit 2
fi
export TERN_BIN=$root/target/release/tern

out=$root/target/runner-soak
mkdir -p "$out"
: >"$out/tally"
passed=0 outer=0 failed=0 reruns=0
for i in $(seq 1 "$uses"); do
	progress=$out/use-$i.progress
	: >"$progress"
	t0=$(date +%s)
	rc=0
	# (binary, test) pairs, each through run-test-binary.py as in `make test-kvm`
	tests/nested-runner --timeout 900 -- bash -c '
		p=$1; shift; rc=0
		while [ $# -ge 2 ]; do tests/run-test-binary.py "$p" "$1" "$2" --exact || rc=1; shift 2; done
		exit $rc' _ "$progress" "$io" late_reader_gets_50_mib_of_stdout_byte_identical \
		"$boot" four_vms_at_once "$boot" ten_mib_through_stdin_comes_back_identical \
		"$life" stdin_eof_after_interactive_use_ends_the_command >"$out/use-$i.log" 2>&1 || rc=$?
	secs=$(($(date +%s) - t0))
	case $rc in
	0) passed=$((passed + 1)) what=passed ;;
	125) outer=$((outer + 1)) what="outer VM failed" ;;
	*) failed=$((failed + 1)) what="a test failed (rc $rc)" ;;
	esac
	if grep -q ' retried ' "$progress"; then
		reruns=$((reruns + 1))
		what="$what, after a rerun: $(grep ' retried ' "$progress" | sed 's|^.*/||' | tr '\n' ' ')"
	fi
	printf '%s use %d/%d: %s (%d s)\n' "$(date -u +%FT%TZ)" "$i" "$uses" "$what" "$secs" | tee -a "$out/tally"
done
echo "runner-soak: $uses uses: $passed passed, $outer outer-VM failures, $failed with a failed test, $reruns with a guest rerun"
[ "$outer" -eq 0 ] && [ "$failed" -eq 0 ]
