#!/usr/bin/env bash
# Build tern's real-KVM test binaries (the tern-tests crate) and print their paths, one a line.
# Used by run-kvm-tests.sh and runner-soak.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -p tern-tests --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])
'
