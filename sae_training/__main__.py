"""``python -m sae_training CONFIG [--field.x value ...] [--no-wandb]``: train SAEs from a YAML config.

Also the entry point under ``torchrun --nproc_per_node N -m sae_training CONFIG``. User errors
print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ipg_sae.config import add_config_flags, load_config, overrides_from_args
from ipg_sae.errors import IPGError

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        overrides = overrides_from_args(args)
        if args.no_wandb:
            overrides["wandb.enabled"] = False
        cfg = load_config(TrainSAEConfig, args.config, overrides)
        from .trainer import train

        text = report(train(cfg))
    except IPGError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
