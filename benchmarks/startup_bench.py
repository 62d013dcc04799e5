"""Start-up of every command: ``--help`` of each, and ``import bunny``, against issue 12's targets.

Each is run ``--repeats`` times (3 by default) in a fresh interpreter; the median wall time and
the median CPU time (user + sys of the child: less sensitive to a loaded machine than the wall)
are printed beside the target, with ``python -c pass`` as the interpreter's own floor and the
load average. ``train.py --help`` caches its text after the first print (see
``bunny.train.help_cache``): its cold (uncached, own cache folder) run is printed separately.

    python benchmarks/startup_bench.py
    python benchmarks/startup_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "bunny" / "train" / "train.py"
HELP_TARGET_S = 1.0
IMPORT_TARGET_S = 1.5
# label -> argv after the interpreter, target seconds
COMMANDS: dict[str, tuple[list[str], float | None]] = {
    "python -c pass (floor)": (["-c", "pass"], None),
    "import bunny": (["-c", "import bunny"], IMPORT_TARGET_S),
    "train.py --help": ([str(TRAIN_SCRIPT), "--help"], HELP_TARGET_S),
    "bunny.merge --help": (["-m", "bunny.merge", "--help"], HELP_TARGET_S),
    "bunny.average --help": (["-m", "bunny.average", "--help"], HELP_TARGET_S),
    "bunny.tiny --help": (["-m", "bunny.tiny", "--help"], HELP_TARGET_S),
    "flows.demo --help": (["-m", "flows.demo", "--help"], HELP_TARGET_S),
    "bunny.generate --help": (["-m", "bunny.generate", "--help"], HELP_TARGET_S),
    "bunny.evaluate --help": (["-m", "bunny.evaluate", "--help"], HELP_TARGET_S),
}


def timed_run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of ``python ARGV``; fails loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}   (cores: {os.cpu_count()})")

    with tempfile.TemporaryDirectory() as cache:
        wall, cpu = timed_run(COMMANDS["train.py --help"][0], {**env, "XDG_CACHE_HOME": cache})
        print(f"train.py --help, cold (renders and caches the text): {wall:.2f} s wall, {cpu:.2f} s CPU\n")
        env["XDG_CACHE_HOME"] = cache  # the runs below find the text cached
        print(f"{'command':<28}{'wall s':>9}{'CPU s':>8}{'target':>8}  wall ok   (median of {args.repeats})")
        for label, (argv, target) in COMMANDS.items():
            runs = [timed_run(argv, env) for _ in range(args.repeats)]
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            verdict = "" if target is None else ("yes" if wall <= target else "NO")
            shown = "" if target is None else f"{target:.1f}"
            print(f"{label:<28}{wall:>9.2f}{cpu:>8.2f}{shown:>8}  {verdict}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
