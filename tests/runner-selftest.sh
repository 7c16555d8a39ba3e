#!/usr/bin/env bash
# Self-test for tests/nested-runner: exit codes, separate byte-exact stdout/stderr,
# binary pass-through, the time limit, /dev/kvm with nested SVM, env pass-through,
# a current directory under /tmp, a writable cache dir, a hung or oopsed outer VM (125), and
# an outer VM that fails before CMD starts (booted again).
#
# Usage: tests/runner-selftest.sh      (TERN_NESTED=1 forces the outer VM)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd -P)
runner=$here/nested-runner
pass=0 fail=0
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

work=$(mktemp -d /tmp/runner-selftest.XXXXXX)
trap 'rm -rf "$work"' EXIT
# the runner's per-run temp dirs go here, so (c) can look for its own leftovers only
export TMPDIR=$work/runs
mkdir -p "$TMPDIR"
# drop the runner's own leading lines from stderr: its notices ("nested-runner: … outer TCG VM
# …", and on a fresh machine "nested-runner: downloading … outer-VM kernel …"), and the report
# of an outer VM that failed before CMD started and was booted again (from "nested-runner: the
# outer VM failed before CMD started" through the console it prints, up to the closing
# "nested-runner: ----"): all of it comes before CMD's first byte. Byte-exact: only whole
# leading lines are dropped, with tail.
strip_notice() {
	local n=0 lines line skipping=0
	lines=$(wc -l <"$1")
	while [ "$n" -lt "$lines" ]; do
		line=$(sed -n "$((n + 1))p" "$1" | tr -d '\0')
		if [ $skipping = 1 ]; then
			[ "$line" = "nested-runner: ----" ] && skipping=0
		elif [ "${line:0:15}" = "nested-runner: " ]; then
			case $line in "nested-runner: the outer VM failed before CMD started"*) skipping=1 ;; esac
		else
			break
		fi
		n=$((n + 1))
	done
	tail -n +$((n + 1)) "$1"
}

# (a) exit code, separate stdout/stderr
t0=$(now)
rc=0
"$runner" -- sh -c 'echo out; echo err >&2; exit 7' >"$work/a.out" 2>"$work/a.err" || rc=$?
t1=$(now)
if [ $rc = 7 ]; then ok "(a) exit code 7 ($(secs "$t0" "$t1") s round trip)"; else bad "(a) exit code $rc, want 7"; fi
if [ "$(od -An -c "$work/a.out")" = "$(printf 'out\n' | od -An -c)" ]; then
	ok "(a) stdout is exactly \"out\\n\""
else
	bad "(a) stdout is $(od -An -c "$work/a.out" | tr -s ' ')"
fi
if [ "$(strip_notice "$work/a.err")" = err ]; then
	ok "(a) stderr is \"err\" (plus the runner's notice lines)"
else
	bad "(a) stderr: $(cat "$work/a.err")"
fi

# (a') in an outer VM, the first boot of its kernel saved the kernel's text symbols, which
# name the outer vCPUs' places when the VM hangs (see (i))
if head -n 1 "$work/a.err" | grep -q '^nested-runner: .*outer TCG VM'; then
	ks=$(ls -t "${TERN_CACHE:-$HOME/.cache/tern}"/runner/linux-image-*/kallsyms 2>/dev/null | head -n 1)
	if [ -n "$ks" ] && [ "$(wc -l <"$ks")" -gt 10000 ] && grep -q ' exc_int3$' "$ks"; then
		ok "(a') outer-kernel symbols saved ($(wc -l <"$ks") in $ks)"
	else
		bad "(a') no outer-kernel symbols saved (${ks:-no kallsyms file})"
	fi
fi

# (b) binary pass-through, byte-exact, run from a cwd under /tmp (shared automatically)
head -c 1000000 /dev/urandom >"$work/f"
want=$(sha256sum <"$work/f")
t0=$(now)
got=$(cd "$work" && "$runner" -- cat f | sha256sum)
t1=$(now)
if [ "$got" = "$want" ]; then ok "(b) 1 MB of random bytes pass through unchanged ($(secs "$t0" "$t1") s)"; else bad "(b) sha256 differs"; fi
# and on stderr too, with \r and \n bytes intact
printf 'a\r\nb\n\0c' >"$work/g"
rc=0
(cd "$work" && "$runner" -- sh -c 'cat g >&2') 2>"$work/g.err" >"$work/g.out" || rc=$?
if [ $rc = 0 ] && strip_notice "$work/g.err" | cmp -s "$work/g" - && [ ! -s "$work/g.out" ]; then
	ok "(b) stderr is byte-exact too (\\r\\n, NUL)"
else
	bad "(b) stderr bytes: rc=$rc $(od -An -c "$work/g.err" | tr -s ' ')"
fi

# (c) time limit
t0=$(now)
rc=0
"$runner" --timeout 20 -- sleep 1000 >"$work/c.out" 2>"$work/c.err" || rc=$?
t1=$(now)
el=$(secs "$t0" "$t1")
if [ $rc = 124 ] && grep -q 'nested-runner: command timed out after 20 s' "$work/c.err" &&
	awk -v e="$el" 'BEGIN { exit !(e < 45) }'; then
	ok "(c) --timeout 20 -> exit 124 with the message after $el s"
else
	bad "(c) rc=$rc after $el s; stderr: $(tail -n 3 "$work/c.err")"
fi
if pgrep -f "$TMPDIR/tern-runner" >/dev/null || [ -n "$(ls -A "$TMPDIR")" ]; then
	bad "(c) left behind: $(pgrep -af "$TMPDIR/tern-runner" | head -n 2) $(ls -A "$TMPDIR")"
else
	ok "(c) no QEMU left behind"
fi

# (d) /dev/kvm with nested SVM inside; in the outer VM, kvm-amd uses shadow paging for the
# nested guests (npt=0, see TERN_RUNNER_KVM_AMD in the runner)
rc=0
out=$("$runner" -- sh -c 'test -c /dev/kvm && echo kvm
	cat /sys/module/kvm_amd/parameters/nested 2>/dev/null || cat /sys/module/kvm_intel/parameters/nested
	if [ "${TERN_RUNNER_INSIDE:-}" = 1 ]; then cat /sys/module/kvm_amd/parameters/npt; else echo host; fi') || rc=$?
line() { printf '%s\n' "$out" | sed -n "$1p"; }
if [ $rc = 0 ] && [ "$(line 1)" = kvm ] && line 2 | grep -Eqx '1|Y' && line 3 | grep -Eqx 'N|0|host'; then
	ok "(d) /dev/kvm present, nested=$(line 2), npt=$(line 3)"
else
	bad "(d) rc=$rc output: $out"
fi

# (e) environment pass-through (and nothing else leaks)
rc=0
out=$(CI=ci-value TERN_SELFTEST_VAR="a 'quoted' \$value" UNRELATED_VAR=leak \
	"$runner" -- sh -c 'printf "%s|%s|%s|%s\n" "$CI" "$TERN_SELFTEST_VAR" "${UNRELATED_VAR-unset}" "$PWD"') || rc=$?
want="ci-value|a 'quoted' \$value|unset|$(pwd -P)"
if [ $rc = 0 ] && [ "$out" = "$want" ]; then
	ok "(e) CI and TERN_* pass through, others do not, cwd kept"
else
	bad "(e) got '$out', want '$want'"
fi

# (f) writable scratch and cache dir inside; repository writable
cache=${TERN_CACHE:-$HOME/.cache/tern}
mkdir -p "$cache"
marker=selftest-$$
rc=0
out=$("$runner" -- sh -c "echo x >/tmp/x && echo x >/var/tmp/x && echo x >\"$cache/$marker\" && echo writable") || rc=$?
if [ $rc = 0 ] && [ "$out" = writable ] && [ -f "$cache/$marker" ]; then
	ok "(f) /tmp, /var/tmp and the cache dir are writable inside (cache writes reach the host)"
else
	bad "(f) rc=$rc out=$out"
fi
rm -f "$cache/$marker"

# (g) a missing command: 127 like a shell
rc=0
"$runner" -- /nonexistent/command >/dev/null 2>"$work/g2.err" || rc=$?
if [ $rc = 127 ]; then ok "(g) missing command -> 127"; else bad "(g) missing command -> $rc"; fi

# (h) CMD may reopen /dev/stdout and /dev/stderr (tee /dev/stderr, > /dev/stdout)
rc=0
"$runner" -- sh -c 'echo o | tee /dev/stderr; echo e2 >/dev/fd/2' >"$work/h.out" 2>"$work/h.err" || rc=$?
if [ $rc = 0 ] && [ "$(cat "$work/h.out")" = o ] && [ "$(strip_notice "$work/h.err")" = "$(printf 'o\ne2')" ]; then
	ok "(h) /dev/stdout, /dev/stderr, /dev/fd/N can be reopened"
else
	bad "(h) rc=$rc out=$(cat "$work/h.out") err=$(cat "$work/h.err")"
fi

# (i) a hung outer VM: CMD starves every other task (real-time spinners on every CPU, RT
# throttling off, and from 6.12 on the fair-class deadline server too), so the init's
# heartbeat stops; the runner says so, shows where the vCPUs are, and exits 125 well before
# the time limit
t0=$(now)
rc=0
TERN_RUNNER_STALL=20 "$runner" --timeout 300 -- sh -c \
	'echo -1 >/proc/sys/kernel/sched_rt_runtime_us || exit 3
	 mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
	 for f in /sys/kernel/debug/sched/fair_server/cpu*/runtime; do [ -e "$f" ] && echo 0 >"$f"; done
	 for i in $(seq "$(nproc)"); do chrt -f 99 sh -c "while :; do :; done" & done; wait' \
	>"$work/i.out" 2>"$work/i.err" || rc=$?
t1=$(now)
el=$(secs "$t0" "$t1")
if [ $rc = 125 ] && grep -q 'the outer VM is hung: its heartbeat .* has not moved for 20 s' "$work/i.err" &&
	grep -q '^nested-runner:   vCPU 0 RIP=0x' "$work/i.err" && awk -v e="$el" 'BEGIN { exit !(e < 150) }'; then
	ok "(i) hung outer VM -> exit 125 after $el s, vCPUs: $(grep -c '^nested-runner:   vCPU' "$work/i.err")"
else
	bad "(i) rc=$rc after $el s; stderr: $(tail -n 8 "$work/i.err")"
fi

# (j) an outer kernel that oopses and runs on: the runner stops it at once (an Oops line at
# emergency level on the outer console is what an oops prints) and exits 125
t0=$(now)
rc=0
"$runner" --timeout 300 -- sh -c 'echo "<0>Oops: 0000 [#1] nested-runner self-test" >/dev/kmsg; sleep 200; echo survived' \
	>"$work/j.out" 2>"$work/j.err" || rc=$?
t1=$(now)
el=$(secs "$t0" "$t1")
if [ $rc = 125 ] && grep -q "the outer VM's kernel failed" "$work/j.err" && grep -q 'Oops: 0000 \[#1\] nested-runner self-test' "$work/j.err" &&
	[ ! -s "$work/j.out" ] && awk -v e="$el" 'BEGIN { exit !(e < 60) }'; then
	ok "(j) outer kernel oops -> exit 125 after $el s"
else
	bad "(j) rc=$rc after $el s; out: $(cat "$work/j.out"); stderr: $(tail -n 8 "$work/j.err")"
fi

# (k) an outer VM that fails before CMD starts has run nothing of CMD: the runner boots it
# again, and exits 125 only when every boot it may make (TERN_RUNNER_BOOTS) has failed
t0=$(now)
rc=0
TERN_RUNNER_SELFTEST_FAIL_BOOTS=1 "$runner" --timeout 300 -- sh -c 'echo ran once' \
	>"$work/k.out" 2>"$work/k.err" || rc=$?
t1=$(now)
if [ $rc = 0 ] && [ "$(cat "$work/k.out")" = "ran once" ] &&
	grep -q 'the outer VM failed before CMD started (boot 1 of at most 3' "$work/k.err" &&
	grep -q 'boot 1 fails before CMD' "$work/k.err"; then
	ok "(k) a boot that failed before CMD -> booted again, CMD ran once ($(secs "$t0" "$t1") s)"
else
	bad "(k) rc=$rc; out: $(cat "$work/k.out"); stderr: $(tail -n 8 "$work/k.err")"
fi
rc=0
TERN_RUNNER_BOOTS=2 TERN_RUNNER_SELFTEST_FAIL_BOOTS=2 "$runner" --timeout 300 -- sh -c 'echo ran' \
	>"$work/k2.out" 2>"$work/k2.err" || rc=$?
if [ $rc = 125 ] && [ ! -s "$work/k2.out" ] && grep -q 'boot 1 fails before CMD' "$work/k2.err" &&
	grep -q 'boot 2 fails before CMD' "$work/k2.err" && ! grep -q 'boot 2 of at most 2' "$work/k2.err"; then
	ok "(k) every boot failed before CMD -> exit 125 after 2 boots"
else
	bad "(k) rc=$rc; out: $(cat "$work/k2.out"); stderr: $(tail -n 8 "$work/k2.err")"
fi

echo "$pass passed, $fail failed"
[ $fail = 0 ]
