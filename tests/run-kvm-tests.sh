#!/usr/bin/env bash
# Build tern's real-KVM test binaries on the host, then run them all in ONE nested-runner
# boot (on a host whose KVM boots Linux directly, the runner just runs them).
# $TERN_TEST_ARGS goes to every test binary (e.g. a test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mapfile -t bins < <(cargo test --release -p tern-tests --no-run --message-format=json 2>/dev/null \
	| python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])
')
if [ ${#bins[@]} -eq 0 ]; then
	echo "run-kvm-tests: no test binaries were built" >&2
	exit 1
fi
export TERN_BIN="$root/target/release/tern"
echo ">> KVM tests: ${bins[*]##*/}"
exec tests/nested-runner --timeout "${TERN_KVM_TEST_TIMEOUT:-2400}" -- \
	bash -c 'rc=0; for b in "$@"; do echo ">> $b"; "$b" --test-threads=1 ${TERN_TEST_ARGS:-} || rc=1; done; exit $rc' _ "${bins[@]}"
