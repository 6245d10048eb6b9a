"""Compare the parity results: every engine against the float64 reference, and vLLM against SGLang.

A cell passes for an engine when every request passes the rule of ``tests/judge.py`` (greedy
tokens equal the reference's, or first differ at a reference tie: top-2 logprob margin <
--tie; chosen-token logprobs within --logprob-tol before that).  Requests that should hit
the prefix cache must have.
Prints a table (cell x engine) and exits non-zero on any failure.

The tie margin and logprob tolerance follow each run's dtype (``judge.RULES``: 1e-3 for
float32, wider for bf16 and fp8) unless given.  A run with fp8 weights (``quantization="fp8"``)
is judged against the reference with its engine's fp8 rounding (``run_reference.py --fp8``,
``tests/fp8.py``).

Usage: python tests/parity/compare.py [--dir build/parity] [--engines vllm sglang] [--tie T]
       [--logprob-tol T] [--report-only] [--only-present]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fp8
import judge
import matrix


def check_request(got: dict, ref: dict, tie: float, tol: float, expect_cache: bool) -> tuple[str, bool, float]:
    """(label, ok, max logprob gap) for one request: judge.check, plus the prefix-cache hit."""
    label, ok, gap = judge.check(got, ref, tie, tol)
    if expect_cache and not (got.get("cached") or 0) >= 2 * matrix.BLOCK:
        ok, label = False, label + f" NO-CACHE-HIT ({got.get('cached')})"
    return label, ok, gap


def check_cell(got: list[dict], ref: list[dict], situation: str, tie: float, tol: float):
    first_wave = len(matrix.SITUATIONS[situation][0])
    labels, ok, gap = [], True, 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        expect_cache = situation == "prefix" and i >= first_wave
        label, good, rgap = check_request(g, r, tie, tol, expect_cache)
        labels.append(label)
        ok, gap = ok and good, max(gap, rgap)
    if len(got) != len(ref):
        ok = False
        labels.append(f"{len(got)} requests, expected {len(ref)}")
    worst = next((lab for lab in labels if lab != "equal"), "equal")
    return f"{worst}, gap {gap:.1e}", ok


def cross(a: list[dict], b: list[dict]) -> str:
    steps, gap = [], 0.0
    for x, y in zip(a, b):
        d = judge.first_diff(x["tokens"], y["tokens"])
        if d is not None:
            steps.append(d)
        for step in range(len(x["tokens"]) if d is None else d):
            la, lb = judge.lp_of(x["top"][step], x["tokens"][step]), judge.lp_of(y["top"][step], x["tokens"][step])
            if la is not None and lb is not None:
                gap = max(gap, abs(la - lb))
    return ("equal" if not steps else f"differ@{min(steps)}") + f", gap {gap:.1e}"


def rule(meta: dict, args) -> tuple[float, float]:
    """(tie, tol) for a run: the command line's, else judge.RULES for the run's dtype."""
    tie, tol = judge.RULES.get(judge.rule_key(meta), (judge.TIE, judge.TOL))
    return (tie if args.tie is None else args.tie), (tol if args.logprob_tol is None else args.logprob_tol)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=matrix.OUT_DIR)
    ap.add_argument("--engines", nargs="+", default=["vllm", "sglang"])
    ap.add_argument("--tie", type=float, help="default: by each run's dtype (judge.RULES)")
    ap.add_argument("--logprob-tol", type=float, help="default: by each run's dtype (judge.RULES)")
    ap.add_argument("--report-only", action="store_true", help="print the table, always exit 0")
    ap.add_argument("--only-present", action="store_true",
                    help="judge only the cells all the engines' files hold (a run restricted to some cells)")
    args = ap.parse_args(argv)

    def load(name):
        path = args.dir / f"{name}.json"
        if not path.exists():
            how = "parity-reference -- --fp8" if name.startswith("reference-fp8") else f"parity-{name}"
            sys.exit(f"missing {path}: run `nox -s {how}` first")
        return json.loads(path.read_text())

    runs = {e: load(e) for e in args.engines}
    ref_names = {e: fp8.reference_name(runs[e]["meta"]) for e in args.engines}
    loaded = {name: load(name)["results"] for name in set(ref_names.values())}
    refs = {e: loaded[name] for e, name in ref_names.items()}
    headers = ["cell"] + [f"{e} ({runs[e]['meta'].get('dtype')})" for e in args.engines]
    if len(args.engines) == 2:
        headers.append(" vs ".join(args.engines))
    rows, passed, failed = [], 0, 0
    present = set.intersection(*({(g, s) for g, cells in r["results"].items() for s in cells}
                                 for r in runs.values()))
    for geometry, situation in matrix.cells():
        if args.only_present and (geometry, situation) not in present:
            continue
        row = [f"{geometry} / {situation}"]
        for e in args.engines:
            got = runs[e]["results"].get(geometry, {}).get(situation)
            if got is None:
                row.append("MISSING")
                failed += 1
                continue
            tie, tol = rule(runs[e]["meta"], args)
            text, ok = check_cell(got, refs[e][geometry][situation], situation, tie, tol)
            row.append(text if ok else f"FAIL {text}")
            passed, failed = passed + ok, failed + (not ok)
        if len(args.engines) == 2:
            a, b = (runs[e]["results"].get(geometry, {}).get(situation) for e in args.engines)
            row.append(cross(a, b) if a and b else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(line)
    for e in args.engines:
        print(f"{e}: {runs[e]['meta']}")
    for e in args.engines:
        tie, tol = rule(runs[e]["meta"], args)
        print(f"{e}: tie margin {tie:g}, logprob tolerance {tol:g}, {matrix.STEPS} greedy steps per request")
    print(f"parity: {passed} passed, {failed} failed")
    if passed + failed == 0:
        print("parity: no cell was compared (the runs hold no common cells)")
        return 0 if args.report_only else 1
    return 0 if args.report_only or failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
