"""Command-line start-up: ``ipg-sae --help`` and a mistyped command against the bare interpreter.

What a user waits for before the first line of help or of an argument error. The reference is the
same interpreter starting and exiting (``python -c pass``): no command line answers faster, so
``help/python`` is the overhead of our imports (target: under 1 s in absolute terms here, which
means torch must not be imported for help or for an argument error).

    .venv/bin/python benchmarks/bench_cli.py --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import common

CASES = {
    "python": [sys.executable, "-c", "pass"],
    "help": [sys.executable, "-m", "ipg_sae", "--help"],
    "typo": [sys.executable, "-m", "ipg_sae", "pipline"],  # "did you mean pipeline?", exit 2
    "command_help": [sys.executable, "-m", "ipg_sae", "sample", "--help"],  # loads the command's config class
}


def _runner(cmd: list[str]):
    def run():
        subprocess.run(cmd, cwd=str(common.REPO), capture_output=True, check=False)
    return run


def main(argv=None) -> int:
    args = common.finish_args(common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
                              .parse_args(argv))
    repeats = args.repeats or (2 if args.smoke else 5)
    times = common.interleaved({k: _runner(v) for k, v in CASES.items()}, repeats=repeats)
    data = {"times": {k: common.summary(v) for k, v in times.items()},
            "seconds": {k: round(min(v), 3) for k, v in times.items()},
            "ratios": {f"{k}/python": common.ratio(times[k], times["python"]) for k in CASES if k != "python"}}
    common.write_section(args, "cli", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
