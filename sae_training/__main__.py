"""``python -m sae_training CONFIG [--field.x value ...] [--no-wandb]``: train SAEs from a YAML config.

Also the entry point under ``torchrun --nproc_per_node N -m sae_training CONFIG``. User errors
print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from ipg_sae.cli import run_job
from ipg_sae.config import add_config_flags

from .config import TrainSAEConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sae_training",
                                     description="Train SAEs on a model's residual stream with sae-lens.")
    parser.add_argument("config", nargs="?", help="YAML config file (defaults are used when omitted)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    add_config_flags(parser, TrainSAEConfig)
    return parser


def report(summary: dict) -> str:
    if not summary:
        return ""  # processes other than 0 print nothing
    if not summary.get("finished"):
        return (f"stopped at step {summary['step']} of {summary['total_steps']}; rerun the same command to resume "
                f"({summary['run_dir']}/checkpoints)")
    lines = [f"trained {len(summary['layers'])} SAE(s), {summary['training_tokens']:,} tokens at "
             f"{summary['throughput']['tokens_per_second']:,.0f} tok/s -> {summary['run_dir']}/"]
    for layer, m in summary["layers"].items():
        lines.append(f"  layer {layer}: explained variance {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, "
                     f"dead {m['dead_fraction']:.1%}, CE loss recovered {m['ce_loss_score']:.3f} "
                     f"(CE clean {m['ce_loss_without_sae']:.3f}, SAE {m['ce_loss_with_sae']:.3f}, "
                     f"zero {m['ce_loss_with_ablation']:.3f}) -> {summary['sae_dirs'][layer]}")
    return "\n".join(lines)


def train_and_report(cfg: TrainSAEConfig) -> None:
    from .trainer import train

    text = report(train(cfg))
    if text:
        print(text)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_job(build_parser().parse_args(argv), TrainSAEConfig, train_and_report)


if __name__ == "__main__":
    sys.exit(main())
