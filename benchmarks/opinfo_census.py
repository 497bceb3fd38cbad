"""How much of torch's operator database the tracer follows exactly.

Every OpInfo entry torch differentiates in float64 on the CPU is run on its own samples (the
zero-size and 0-dim ones, and a few small ordinary ones) and compared with torch's Jacobian.
An entry is *exact* when every sample checked gives torch's Jacobian, *refused* when some
sample is refused by the package's own error and none is wrong, *wrong* when any differs, and
*crash* when any raises another exception. Entries with no checkable sample are counted apart.

    python benchmarks/opinfo_census.py [--markdown docs/opinfo.md] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from opinfo import differentiable_entries, entry_id, verdicts  # noqa: E402

ORDER = ("wrong", "crash", "refused", "exact")


def census(only=()):
    results = {}
    for op in differentiable_entries():
        name = entry_id(op)
        if only and name not in only and op.name not in only:
            continue
        seen = list(verdicts(op))
        if not seen:
            results[name] = ("unchecked", "")
            continue
        worst = min(seen, key=lambda v: ORDER.index(v[1]))
        results[name] = (worst[1], f"{worst[0]}: {worst[2]}"[:200] if worst[1] != "exact" else "")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table of entries here")
    ap.add_argument("--only", nargs="*", default=(), help="entry names to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    results = census(set(args.only))
    counts = collections.Counter(v for v, _ in results.values())
    checked = sum(counts[k] for k in ORDER)
    print(f"torch {torch.__version__}: {len(results)} entries, {checked} checked in "
          f"{time.perf_counter() - t0:.0f} s")
    for k in (*ORDER, "unchecked"):
        share = f" ({100 * counts[k] / checked:.0f}% of those checked)" if k in ORDER else ""
        print(f"  {k:9s} {counts[k]:4d}{share}")
    for k in ("wrong", "crash"):
        for name, (v, detail) in sorted(results.items()):
            if v == k:
                print(f"{k.upper()} {name}: {detail}")
    if args.markdown:
        lines = ["| entry | verdict | first sample not exact |", "|---|---|---|"]
        for name, (v, detail) in sorted(results.items()):
            lines.append(f"| `{name}` | {v} | {detail.replace('|', '/')} |")
        pathlib.Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
