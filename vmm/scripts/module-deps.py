#!/usr/bin/env python3
"""Print the dependency graph between the vmm crate's modules and fail on a cycle.

Reads every `.rs` file under vmm/src as text: a file belongs to the module named by its path
(`--depth 1`: the top-level module, `vstate`, `boot`, ...; `--depth 2`: `devices::fs`, ...),
and depends on every module it names as `crate::a::b`, `super::a` or `self::a` in code
(comments are skipped). A module's use of its own ancestors (a child reading its parent's
items) is how Rust nests modules and is not counted. Exit status 1 on a cycle.
"""
import argparse
import re
import sys
from pathlib import Path

def module_path(rel: Path) -> list:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return [] if parts == ["lib"] else parts

def module_of(rel: Path, depth: int) -> str:
    return "::".join(module_path(rel)[:depth]) or "lib"

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    ap.add_argument("--depth", type=int, default=1)
    args = ap.parse_args()
    src = Path(args.src)
    modules = {module_of(p.relative_to(src), args.depth) for p in src.rglob("*.rs")}
    graph = {m: set() for m in modules}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        me = module_of(rel, args.depth)
        here = module_path(rel)
        for line in path.read_text().splitlines():
            code = line.split("//", 1)[0]
            for match in re.finditer(r"\b(crate|self|super(?:::super)*)((?:::\w+)+)", code):
                names = match.group(2).strip(":").split("::")
                if match.group(1) == "self":
                    names = here + names
                elif match.group(1).startswith("super"):
                    names = here[: max(0, len(here) - match.group(1).count("super"))] + names
                for n in range(min(args.depth, len(names)), 0, -1):
                    target = "::".join(names[:n])
                    if target in modules:
                        break
                else:
                    continue
                if target != me and target != "lib" and not me.startswith(target + "::"):
                    graph[me].add(target)
    # Kahn's algorithm: what is left after peeling off modules with no remaining dependency is a cycle.
    order, left = [], {m: set(d) for m, d in graph.items()}
    while True:
        ready = sorted(m for m, d in left.items() if not d)
        if not ready:
            break
        for m in ready:
            order.append(m)
            del left[m]
        for d in left.values():
            d.difference_update(ready)
    for m in order + sorted(left):
        print(f"{m:24} -> {', '.join(sorted(graph[m])) or '(nothing)'}")
    if left:
        print(f"CYCLE among: {', '.join(sorted(left))}")
        return 1
    print(f"acyclic; bottom-up order: {' < '.join(order)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
