#!/usr/bin/env python3
"""Watchable mounts: host change -> inotify event in the guest, stage by stage, against the floor.

For each mode, boots one VM with `tern run --share DIR:/mnt/w:watch -- /init watch-events
--stamps --echo /mnt/w` (the agent's inotify printer), then rewrites a file in DIR N times.
Each sample is measured on the host: from just before the write to the moment the guest's
`MODIFY f` line arrives on tern's stdout (so it includes the return trip over the stdout
stream, the same in both modes). Updates are spaced by a random 20-80 ms in event mode and by a
random 0-2 s in poll mode, so a change lands at a random phase of the 2 s poll (a fixed short
gap would lock the changes to just after each poll and measure the worst case).

The floor, in the same boot as the events samples: before each update, a line written to
tern's stdin and echoed back by the same guest process (`ECHO line`: the stdio path the events
come back on), and after the updates, 200 small agent requests over vsock (`tern run` times
them when $TERN_WATCH_STAGES_OUT is set). Events-mode latency is reported as a multiple of the
echo floor.

Stages: every change batch carries host stamps (inotify read, coalescer flush, vsock send; host
wall clock) and the agent stamps its receipt, sync start and mirror applied on the guest's
monotonic clock, which `watch-events --stamps` prints too. Host and guest clocks differ, so each
stage is a difference on one clock; the two hops that cross clocks (vsock send -> agent receipt,
and the guest's stdout line -> the host) are reported together as "transport", what is left of
the round trip. The write -> inotify read stage compares the bench's wall clock with the
watcher's (same host clock).

Only ratios within one run are meaningful (everything runs emulated in the runner).
Writes tests/bench/results/watch_latency.{json,md}. Stdlib only.
"""

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"

# Stage name, and how it is computed from one matched sample (all in ms).
STAGES = [
    "host write -> inotify read",
    "inotify read -> coalescer flush",
    "flush -> vsock send",
    "transport (send -> agent receipt, guest stdout -> host)",
    "agent receipt -> sync start",
    "sync start -> watcher's inotify event",
]
# Not on the path of the sample (the watcher's event fires while the sync is still writing).
SYNC_STAGE = "sync start -> whole sync applied"


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(samples):
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "mean_ms": statistics.fmean(samples) if samples else float("nan"),
        "max_ms": max(samples) if samples else float("nan"),
    }


def stage_breakdown(updates, batches):
    """Match each update (write wall ns, total ms, seen guest mono ns) with the first batch whose
    inotify read followed the write; returns {stage: [ms...]}."""
    per = {name: [] for name in STAGES + [SYNC_STAGE]}
    rows = []
    for b in batches:
        if not b.get("send_unix_ns"):
            continue
        read = b["send_unix_ns"] - b["flush_to_send_ns"] - b["read_to_flush_ns"]
        rows.append((read, b))
    rows.sort(key=lambda r: r[0])
    for write_ns, total_ms, seen_mono in updates:
        match = next(((read, b) for read, b in rows if read >= write_ns), None)
        if match is None or seen_mono is None:
            continue
        read, b = match
        ms = lambda ns: ns / 1e6
        parts = [
            ms(read - write_ns),
            ms(b["read_to_flush_ns"]),
            ms(b["flush_to_send_ns"]),
            None,
            ms(b["apply_start_mono_ns"] - b["receipt_mono_ns"]),
            ms(seen_mono - b["apply_start_mono_ns"]),
        ]
        if parts[5] < 0:  # the event came from an earlier batch: no match
            continue
        parts[3] = total_ms - sum(p for p in parts if p is not None)
        for name, value in zip(STAGES, parts):
            per[name].append(value)
        per[SYNC_STAGE].append(ms(b["applied_mono_ns"] - b["apply_start_mono_ns"]))
    return per


def measure(tern, mode, updates, boot_timeout, update_timeout):
    work = Path(tempfile.mkdtemp(prefix=f"tern-watch-{mode}-", dir=ROOT / "target"))
    share = work / "share"
    share.mkdir()
    (share / "f").write_text("start")
    config = work / "tern.toml"
    config.write_text(f'[fs]\nwatch_mode = "{mode}"\n')
    stages_out = work / "stages.json"
    cmd = [tern, "--config", str(config), "run", "--share", f"{share}:/mnt/w:watch", "--",
           "/init", "watch-events", "--stamps", "--echo", "/mnt/w"]
    env = dict(os.environ, TERN_WATCH_STAGES_OUT=str(stages_out))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, env=env)
    lines = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put((time.monotonic(), line.rstrip("\n")))
        lines.put((time.monotonic(), None))

    threading.Thread(target=reader, daemon=True).start()

    def next_line(deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        stamp, line = lines.get(timeout=left)
        if line is None:
            raise RuntimeError(f"tern exited: {proc.stderr.read()}")
        return stamp, line

    def drain():
        while not lines.empty():  # the write's second MODIFY, stray events
            lines.get_nowait()

    samples, echoes, matched = [], [], []
    try:
        deadline = time.monotonic() + boot_timeout
        while next_line(deadline)[1] != "WATCHING":
            pass
        for i in range(updates):
            if mode == "events":
                time.sleep(random.uniform(0.01, 0.04))
                drain()
                start = time.monotonic()
                proc.stdin.write(f"ping {i}\n")
                proc.stdin.flush()
                deadline = start + update_timeout
                while True:
                    stamp, line = next_line(deadline)
                    if line == f"ECHO ping {i}":
                        echoes.append((stamp - start) * 1000.0)
                        break
            time.sleep(random.uniform(0.01, 0.04) if mode == "events" else random.uniform(0.0, 2.0))
            drain()
            start = time.monotonic()
            write_ns = time.time_ns()
            with open(share / "f", "w") as f:
                f.write(f"update {i}")
            deadline = start + update_timeout
            while True:
                stamp, line = next_line(deadline)
                if line.startswith("MODIFY f"):
                    total = (stamp - start) * 1000.0
                    samples.append(total)
                    seen = line.split()[2:3]
                    matched.append((write_ns, total, int(seen[0]) if seen else None))
                    break
        proc.stdin.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stages = json.loads(stages_out.read_text()) if stages_out.exists() else {}
    return samples, echoes, matched, stages


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tern", default=str(ROOT / "target" / "release" / "tern"))
    ap.add_argument("--updates", type=int, default=int(os.environ.get("TERN_WATCH_UPDATES", "200")))
    ap.add_argument("--poll-updates", type=int, default=int(os.environ.get("TERN_WATCH_POLL_UPDATES", "100")))
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    ap.add_argument("--update-timeout", type=float, default=30.0)
    ap.add_argument("--events-only", action="store_true", help="skip poll mode (no poll ratio)")
    args = ap.parse_args()

    results, floor, stages, recent, raw = {}, {}, {}, [], {}
    modes = [("events", args.updates)] + ([] if args.events_only else [("poll", args.poll_updates)])
    for mode, n in modes:
        print(f"watch latency: {mode} mode, {n} updates ...", flush=True)
        samples, echoes, matched, agent = measure(args.tern, mode, n, args.boot_timeout, args.update_timeout)
        results[mode] = dict(summary(samples), samples_ms=samples)
        r = results[mode]
        print(f"  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms", flush=True)
        if mode == "events":
            floor["echo"] = dict(summary(echoes), samples_ms=echoes)
            rtt = [ns / 1e6 for ns in agent.get("agent_round_trips_ns", [])]
            floor["agent_rpc"] = dict(summary(rtt), samples_ms=rtt)
            recent = agent.get("batches") or []
            stages = {k: dict(summary(v)) for k, v in stage_breakdown(matched, recent).items()}
            raw = {"updates": matched, "batches": recent}

    ev, echo = results["events"], floor["echo"]
    ratios = {"p50_events_over_echo": ev["p50_ms"] / echo["p50_ms"], "p99_events_over_echo": ev["p99_ms"] / echo["p99_ms"]}
    targets = {"p50_le_1.5x_echo": ratios["p50_events_over_echo"] <= 1.5,
               "p99_le_3x_echo": ratios["p99_events_over_echo"] <= 3.0}
    if "poll" in results:
        po = results["poll"]
        ratios["p50_events_over_poll"] = ev["p50_ms"] / po["p50_ms"]
        ratios["p99_events_over_poll"] = ev["p99_ms"] / po["p99_ms"]
        targets["p99_le_0.02x_poll"] = ratios["p99_events_over_poll"] <= 0.02
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results, "floor": floor, "stages": stages,
           "ratios": ratios, "targets": targets, "raw": raw,
           "note": "host write -> guest inotify MODIFY line on tern stdout; floors and stages from the events boot; "
                   "inside the nested runner (emulated)"}
    (RESULTS / "watch_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Watchable mounts: change -> guest inotify latency", "",
          "| path | samples | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    rows = [("events mode", ev), ("floor: stdio echo round trip", echo),
            ("floor: agent RPC round trip (vsock)", floor["agent_rpc"])]
    if "poll" in results:
        rows.append(("poll mode (Kata's 2 s)", results["poll"]))
    for name, r in rows:
        md.append(f"| {name} | {r['n']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} |")
    md += ["", "Events mode by stage (one row per stage, each sample matched to its change batch):", "",
           "| stage | samples | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name in STAGES + [SYNC_STAGE]:
        r = stages.get(name)
        if r:
            md.append(f"| {name} | {r['n']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    met = lambda k: "met" if targets.get(k) else "NOT met"
    md += ["", f"events / echo floor: p50 {ratios['p50_events_over_echo']:.2f}x (target <= 1.5x: "
               f"{met('p50_le_1.5x_echo')}), p99 {ratios['p99_events_over_echo']:.2f}x (target <= 3x: "
               f"{met('p99_le_3x_echo')})"]
    if "poll" in results:
        md.append(f"events / poll: p50 {ratios['p50_events_over_poll']:.4f}x, p99 "
                  f"{ratios['p99_events_over_poll']:.4f}x (target <= 0.02x: {met('p99_le_0.02x_poll')})")
    md.append("")
    (RESULTS / "watch_latency.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
