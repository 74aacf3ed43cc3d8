"""The engine before and after a change, in one run: ``python -m bench.compare --before REV``.

This machine's speed drifts by 10-30% between processes and over minutes, so two engines are only
compared within one run: each round runs the SDSS loop (the baseline, the C library's malloc
defaults), then per mode the engine *before* (revision ``REV`` checked out into a temporary git
worktree, or this tree with ``--before-env``) and *after* (this working tree), each a
``bench.engine`` process of its own. Prints a markdown table of spectra/s per round and the
after/before ranges. ``--before HEAD --before-env GLIBC_TUNABLES=`` compares this tree with the
C library's malloc defaults against its own settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def phase(tree: Path, mode: str, spectra: int, env: dict[str, str], out: Path) -> dict:
    argv = [sys.executable, "-m", "bench.engine", "--mode", mode, "--spectra", str(spectra), "--out", str(out)]
    env = dict(env, PYTHONPATH=str(tree))  # that tree's stream_worker, whatever the venv has installed
    result = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rounds: list[dict], modes: tuple[str, ...]) -> str:
    """One row per round: the baseline, then before/after per mode with after's ratio to the baseline."""
    head = ["round", "(a) baseline"] + [f"{mode} {side}" for mode in modes for side in ("before", "after")] + \
        [f"{mode} after × (a)" for mode in modes]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for i, r in enumerate(rounds, 1):
        base = r["baseline"]["spectra_per_s"]
        cells = [f"{base:.2f}"] + [f"{r[mode][side]['spectra_per_s']:.2f}" for mode in modes for side in ("before", "after")] + \
            [f"{r[mode]['after']['spectra_per_s'] / base:.2f}" for mode in modes]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    for mode in modes:
        gains = [r[mode]["after"]["spectra_per_s"] / r[mode]["before"]["spectra_per_s"] - 1 for r in rounds]
        lines.append(f"\n{mode}: after against before {min(gains):+.0%} to {max(gains):+.0%} (spectra/s, per round); "
                     f"plans after: " + "; ".join(f"`{r[mode]['after']['plan']}`" for r in rounds))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision, e.g. HEAD~3 or 9e5019b")
    parser.add_argument("--before-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the before engine's processes (repeatable)")
    parser.add_argument("--modes", default="exact,fast")
    parser.add_argument("--spectra", type=int, default=48)
    parser.add_argument("--baseline-spectra", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = tuple(args.modes.split(","))
    before_env = dict(os.environ, **dict(item.split("=", 1) for item in args.before_env))
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            rounds = []
            for i in range(args.rounds):
                print(f"round {i + 1} of {args.rounds} ...", file=sys.stderr)
                out = Path(tmp) / "out.npz"
                r = {"baseline": phase(REPO, "baseline", args.baseline_spectra, dict(os.environ), out)}
                for mode in modes:
                    r[mode] = {"before": phase(before_tree, mode, args.spectra, before_env, out),
                               "after": phase(REPO, mode, args.spectra, dict(os.environ), out)}
                rounds.append(r)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO, check=True)
    print(f"before: {args.before} {' '.join(args.before_env)}; after: this tree; spectra/s\n")
    print(table(rounds, modes))


if __name__ == "__main__":
    main()
