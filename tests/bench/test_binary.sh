#!/usr/bin/env bash
# Build the tern-tests integration test NAME (tests/tests/NAME.rs) in release and print the
# path of its binary, for the benchmarks that run an ignored test inside the nested runner.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: test_binary.sh NAME}
bin=$(cargo test --release -p tern-tests --test "$name" --no-run --message-format=json 2>/dev/null |
	python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])
' "$name")
[ -n "$bin" ] || { echo "test_binary: the test binary $name was not built" >&2; exit 1; }
echo "$bin"
