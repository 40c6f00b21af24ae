"""fastrnn's speed relative to torch.nn from a pytest-benchmark JSON (``--benchmark-json``).

    python -m pytest bench/ --benchmark-only --benchmark-json=bench-cpu.json
    python -m bench.ratio bench-cpu.json [--min 0.9] [--stat median]

For every benchmark group holding both implementations it prints ``time(torch.nn) / time(fastrnn)``
(above 1: fastrnn is faster) and exits 1 when any ratio is below ``--min``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

#: The issue's requirement: fastrnn at least 0.9x torch.nn's speed, forward+backward.
REQUIRED = 0.9


def ratios(data: dict, stat: str = "median") -> dict[str, dict]:
    """``{group: {"fastrnn": s, "torch.nn": s, "ratio": torch/fastrnn}}`` from pytest-benchmark JSON."""
    groups: dict[str, dict] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench.get("extra_info", {}).get("impl") or bench["params"].get("impl")
        groups[bench["group"]][impl] = bench["stats"][stat]
    result = {}
    for group, times in sorted(groups.items()):
        if "fastrnn" in times and "torch.nn" in times:
            result[group] = {**times, "ratio": times["torch.nn"] / times["fastrnn"]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--min", type=float, default=REQUIRED, help=f"smallest acceptable ratio (default {REQUIRED})")
    parser.add_argument("--stat", default="median", choices=("median", "mean", "min"), help="statistic compared")
    args = parser.parse_args(argv)
    table = ratios(json.loads(args.json.read_text()), args.stat)
    if not table:
        print("no group holds both fastrnn and torch.nn", file=sys.stderr)
        return 1
    width = max(len(g) for g in table)
    fastest = ratios(json.loads(args.json.read_text()), "min")
    print(f"{'group':<{width}}  {'fastrnn ms':>10}  {'torch.nn ms':>11}  {'ratio':>6}  {'(of mins)':>9}  verdict")
    failed = False
    for group, entry in table.items():
        ok = entry["ratio"] >= args.min
        failed |= not ok
        print(f"{group:<{width}}  {entry['fastrnn'] * 1e3:>10.3f}  {entry['torch.nn'] * 1e3:>11.3f}  "
              f"{entry['ratio']:>5.2f}x  {fastest[group]['ratio']:>8.2f}x  {'ok' if ok else 'BELOW ' + str(args.min)}")
    print(f"\nratio = torch.nn {args.stat} / fastrnn {args.stat} (above 1: fastrnn faster); required >= {args.min}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
