"""How fast the command line answers: ``negvision --help``, a group's help, and a wrong choice value (which must
fail while parsing, before torch is imported), next to a bare Python start-up in the same run.

    python benchmarks/cli_speed.py [--repeats 5]   # one JSON line, median wall seconds per command
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = {
    "python_startup": [sys.executable, "-c", "pass"],
    "negvision_help": [sys.executable, "-m", "vision.cli", "--help"],
    "negvision_version": [sys.executable, "-m", "vision.cli", "--version"],
    "detect_train_help": [sys.executable, "-m", "vision.cli", "detect", "train", "--help"],
    "wrong_choice_amp": [sys.executable, "-m", "vision.cli", "detect", "train", "--data", "x", "--amp", "maybe"],
    "wrong_choice_optimizer": [sys.executable, "-m", "vision.cli", "defect", "train", "--data", "x", "--optimizer",
                               "foo"],
}
EXPECTED_RC = {"wrong_choice_amp": 2, "wrong_choice_optimizer": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out: dict = {"benchmark": "cli_speed", "repeats": args.repeats, "median_s": {}, "exit_codes": {}}
    for name, cmd in CASES.items():
        times, rc = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            rc = proc.returncode
        out["median_s"][name] = round(statistics.median(times), 3)
        out["exit_codes"][name] = rc
        if rc != EXPECTED_RC.get(name, 0):
            raise SystemExit(f"{name}: exit {rc}, expected {EXPECTED_RC.get(name, 0)}\n{proc.stderr[-2000:]}")
    out["all_under_1s"] = all(v < 1.0 for k, v in out["median_s"].items())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
