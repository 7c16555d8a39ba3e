#!/usr/bin/env bash
# Build tern's real-KVM test binaries on the host, then run them all in ONE nested-runner
# boot (on a host whose KVM boots Linux directly, the runner just runs them).
# $TERN_TEST_ARGS goes to every test binary (e.g. a test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mapfile -t bins < <(tests/kvm-test-bins.sh)
if [ ${#bins[@]} -eq 0 ]; then
	echo "run-kvm-tests: no test binaries were built" >&2
	exit 1
fi
export TERN_BIN="$root/target/release/tern"

# Each binary runs through tests/run-test-binary.py (inside the runner a test that failed only
# because its guest triple-faulted or its agent never answered at boot runs once more,
# recorded and summed up below; TERN_KVM_RETRY=0 turns that off). Its outcome is
# recorded (inside the runner) in $progress, under the repo, which the runner shares read-write.
progress=$root/target/kvm-tests.progress
: >"$progress"
run_in_runner() {
	tests/nested-runner --timeout "${TERN_KVM_TEST_TIMEOUT:-2400}" -- \
		bash -c 'p=$1; shift; rc=0
			for b in "$@"; do
				echo ">> $b"
				tests/run-test-binary.py "$p" "$b" ${TERN_TEST_ARGS:-} || rc=1
			done
			exit $rc' _ "$progress" "$@"
}

echo ">> KVM tests: ${bins[*]##*/}"
rc=0
run_in_runner "${bins[@]}" || rc=$?
# 125: the outer VM itself failed (its kernel oopsed, crashed or hung under the emulated SVM —
# the runner printed its console); that is not a test result. The binaries that had not finished
# get a fresh runner boot, at most three times; what had finished keeps its result.
boots=1
while [ "$rc" -eq 125 ] && [ "${TERN_KVM_RETRY:-1}" = 1 ] && [ $boots -lt 4 ]; do
	remaining=()
	for b in "${bins[@]}"; do
		grep -qxF "$b ok" "$progress" || grep -qxF "$b failed" "$progress" || remaining+=("$b")
	done
	echo ">> the outer VM failed (console above): rerunning the ${#remaining[@]} test binaries that had not finished in a fresh runner boot" >&2
	boots=$((boots + 1))
	rc=0
	run_in_runner "${remaining[@]}" || rc=$?
done
[ $boots -eq 1 ] || echo ">> the KVM tests needed $boots runner boots (the outer VM failed $((boots - 1)) time(s))" >&2
if grep -q ' retried ' "$progress"; then
	echo ">> RERUN after a guest that never got going (see RETRY above):" >&2
	grep ' retried ' "$progress" | sed 's|^.*/|>>   |' >&2
fi
if grep -q ' failed$' "$progress"; then
	echo ">> failed test binaries: $(grep ' failed$' "$progress" | sed 's| failed$||; s|.*/||' | tr '\n' ' ')" >&2
	[ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
