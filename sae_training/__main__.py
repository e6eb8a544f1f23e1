"""``python -m sae_training CONFIG [--field.x value ...] [--no-wandb]``: train SAEs from a YAML config.

Also the entry point under ``torchrun --nproc_per_node N -m sae_training CONFIG``. User errors
print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from ipg_sae.command import run_job
from ipg_sae.config import add_config_flags

from .config import TrainSAEConfig
from .report import train_and_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sae_training",
                                     description="Train SAEs on a model's residual stream with sae-lens.")
    parser.add_argument("config", nargs="?", help="YAML config file (defaults are used when omitted)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--verify", action="store_true",
                        help="hash every input and output file afresh (ignore the digest memo of unchanged files)")
    add_config_flags(parser, TrainSAEConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_job(build_parser().parse_args(argv), TrainSAEConfig, train_and_report)


if __name__ == "__main__":
    sys.exit(main())
