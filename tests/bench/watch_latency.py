#!/usr/bin/env python3
"""Watchable mounts: host change -> inotify event in the guest, event mode vs poll mode.

For each mode, boots one VM with `tern run --share DIR:/mnt/w:watch -- /init watch-events
/mnt/w` (the agent's inotify printer), then rewrites a file in DIR N times. Each sample is
measured on the host: from just before the write to the moment the guest's `MODIFY f` line
arrives on tern's stdout (so it includes the return trip over the stdout stream, the same in
both modes). Updates are spaced by a random 20-80 ms in event mode and by a random 0-2 s in
poll mode, so a change lands at a random phase of the 2 s poll (a fixed short gap would lock
the changes to just after each poll and measure the worst case). Only ratios within one run are meaningful (everything runs emulated in the runner).

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


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(tern, mode, updates, boot_timeout, update_timeout):
    work = Path(tempfile.mkdtemp(prefix=f"tern-watch-{mode}-", dir=ROOT / "target"))
    share = work / "share"
    share.mkdir()
    (share / "f").write_text("start")
    config = work / "tern.toml"
    config.write_text(f'[fs]\nwatch_mode = "{mode}"\n')
    cmd = [tern, "--config", str(config), "run", "--share", f"{share}:/mnt/w:watch", "--",
           "/init", "watch-events", "/mnt/w"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
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

    samples = []
    try:
        deadline = time.monotonic() + boot_timeout
        while next_line(deadline)[1] != "WATCHING":
            pass
        for i in range(updates):
            time.sleep(random.uniform(0.02, 0.08) if mode == "events" else random.uniform(0.0, 2.0))
            while not lines.empty():  # the write's second MODIFY, stray events
                lines.get_nowait()
            start = time.monotonic()
            with open(share / "f", "w") as f:
                f.write(f"update {i}")
            deadline = start + update_timeout
            while True:
                stamp, line = next_line(deadline)
                if line == "MODIFY f":
                    samples.append((stamp - start) * 1000.0)
                    break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tern", default=str(ROOT / "target" / "release" / "tern"))
    ap.add_argument("--updates", type=int, default=int(os.environ.get("TERN_WATCH_UPDATES", "200")))
    ap.add_argument("--poll-updates", type=int, default=int(os.environ.get("TERN_WATCH_POLL_UPDATES", "200")))
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    ap.add_argument("--update-timeout", type=float, default=30.0)
    args = ap.parse_args()

    results = {}
    for mode, n in (("events", args.updates), ("poll", args.poll_updates)):
        print(f"watch latency: {mode} mode, {n} updates ...", flush=True)
        samples = measure(args.tern, mode, n, args.boot_timeout, args.update_timeout)
        results[mode] = {
            "updates": len(samples),
            "p50_ms": percentile(samples, 50),
            "p99_ms": percentile(samples, 99),
            "mean_ms": statistics.fmean(samples) if samples else float("nan"),
            "max_ms": max(samples) if samples else float("nan"),
            "samples_ms": samples,
        }
        r = results[mode]
        print(f"  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms", flush=True)

    ev, po = results["events"], results["poll"]
    ratios = {"p50_events_over_poll": ev["p50_ms"] / po["p50_ms"], "p99_events_over_poll": ev["p99_ms"] / po["p99_ms"]}
    targets = {"p99_le_10ms": ev["p99_ms"] <= 10.0, "p99_ratio_le_0.01": ratios["p99_events_over_poll"] <= 0.01}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results, "ratios": ratios, "targets": targets,
           "note": "host write -> guest inotify MODIFY line on tern stdout; inside the nested runner (emulated)"}
    (RESULTS / "watch_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Watchable mounts: change -> guest inotify latency", "",
          "| mode | updates | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for mode in ("events", "poll"):
        r = results[mode]
        md.append(f"| {mode} | {r['updates']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    md += ["", f"events/poll: p50 {ratios['p50_events_over_poll']:.4f}x, p99 {ratios['p99_events_over_poll']:.4f}x "
           f"(targets: p99 <= 10 ms: {'met' if targets['p99_le_10ms'] else 'NOT met'}; "
           f"<= 0.01x poll: {'met' if targets['p99_ratio_le_0.01'] else 'NOT met'})", ""]
    (RESULTS / "watch_latency.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
