"""What a finished (or stopped) training run prints: one line per SAE with its metrics."""

from __future__ import annotations

from .config import TrainSAEConfig


def report(summary: dict) -> str:
    """The text of a :func:`sae_training.train` summary (empty on processes other than rank 0)."""
    if not summary:
        return ""
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
    """Train with ``cfg`` and print the report: the body of ``ipg-sae train-sae`` and ``python -m sae_training``."""
    from .trainer import train

    text = report(train(cfg))
    if text:
        print(text)
