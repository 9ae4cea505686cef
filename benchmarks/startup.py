"""How fast the CLI starts: `ftwt --help` against a bare interpreter, and a real command up to the start of
its work against importing torch and torchvision.

Each variant is one fresh process; the variants run alternately for --rounds rounds (so drifting load hits
each) and the figures are medians of wall time, with CPU time beside them (steadier under load). The command is `ftwt eval --checkpoint missing.pt`: it
imports what eval needs, resolves the profile and exits with bad input (code 2) where the work would start.

Goals: help ≤ 0.25 s above `python -c pass`; the command ≤ 1.2 × `python -c "import torch, torchvision"`.

    python benchmarks/startup.py --quick --json > startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELP_GOAL_S = 0.25
COMMAND_GOAL_RATIO = 1.2

#: name → (argv, the exit code that shows it ran as intended)
VARIANTS = {
    "bare": ([sys.executable, "-c", "pass"], 0),
    "help": ([sys.executable, "-m", "ftwt_cli", "--help"], 0),
    "torch": ([sys.executable, "-c", "import torch, torchvision"], 0),
    "command": ([sys.executable, "-m", "ftwt_cli", "eval", "--checkpoint", "missing.pt"], 2),
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(argv: list[str], expected: int, cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU time is the steadier figure on a shared machine."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if done.returncode != expected:
        sys.exit(f"{' '.join(argv[1:])} exited {done.returncode}, expected {expected}: {done.stderr.decode()[-500:]}")
    return elapsed, cpu


def measure(rounds: int) -> dict[str, list[tuple[float, float]]]:
    # This tree's ftwt_cli, run from an empty folder (missing.pt is missing there).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as cwd:
        for name, (argv, code) in VARIANTS.items():  # one untimed run each: warm the file cache
            time_once(argv, code, cwd, env)
        for _ in range(rounds):
            for name, (argv, code) in VARIANTS.items():
                times[name].append(time_once(argv, code, cwd, env))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int, help="rounds of the four variants (default 15, --quick 5)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)

    load_before = os.getloadavg()
    times = measure(rounds)
    load_after = os.getloadavg()
    median = {name: statistics.median(wall for wall, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    help_over_bare = median["help"] - median["bare"]
    command_over_torch = median["command"] / median["torch"]
    doc = {
        "rounds": rounds,
        "median_s": median,
        "median_cpu_s": cpu,
        "help_over_bare_s": help_over_bare,
        "command_over_torch": command_over_torch,
        "cpu_help_over_bare_s": cpu["help"] - cpu["bare"],
        "cpu_command_over_torch": cpu["command"] / cpu["torch"],
        "goals": {
            "help_over_bare_s": {"goal": HELP_GOAL_S, "measured": help_over_bare, "met": help_over_bare <= HELP_GOAL_S},
            "command_over_torch": {
                "goal": COMMAND_GOAL_RATIO, "measured": command_over_torch, "met": command_over_torch <= COMMAND_GOAL_RATIO,
            },
        },
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpus": os.cpu_count(),
    }  # fmt: skip
    out = sys.stderr if args.json else sys.stdout
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, {os.cpu_count()} CPUs", file=out)
    for name, (argv, _) in VARIANTS.items():
        print(f"{name:8} median {median[name]:.3f} s wall, {cpu[name]:.3f} s CPU over {rounds}: {' '.join(argv[1:])}", file=out)
    for key, goal in doc["goals"].items():
        print(f"{key}: {goal['measured']:.3f} (goal ≤ {goal['goal']:g}) {'met' if goal['met'] else 'NOT met'}", file=out)
    print(f"CPU time: help − bare {doc['cpu_help_over_bare_s']:.3f} s, command ÷ torch {doc['cpu_command_over_torch']:.3f}", file=out)
    print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}", file=out)
    if args.json:
        print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
