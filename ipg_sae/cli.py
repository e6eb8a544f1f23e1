"""``ipg-sae``: a thin command line over :mod:`ipg_sae.jobs`.

Each subcommand takes a YAML config (``configs/``); any field can be overridden with a
dotted flag (``--sampling.temperature 0.5``). User errors print one line and exit 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable

# Commands: name -> (help, config class loader, runner). Loaders import lazily, and only the command
# that runs has its config class loaded (its flags come from it), so that `ipg-sae --help` and a
# mistyped command answer without importing torch. The config classes live in torch-free modules
# (*_config.py), so a command's --help, a mistyped flag or a config file's typo answer without torch
# too (tests/test_cli.py checks every command); torch loads with the runner.
Command = tuple[str, Callable[[], type], Callable[[], Callable]]


def _sample_cfg():
    from .jobs_config import SampleJobConfig

    return SampleJobConfig


def _sample_run():
    from .jobs import run_sample

    return lambda cfg: print(f"{_sample_line(run_sample(cfg))} -> {cfg.run_dir}/")


def _sample_line(metrics: dict) -> str:
    return (f"accuracy {metrics['accuracy']:.3f} over {metrics['n']} samples (mean reward {metrics['mean_reward']:.3f}, "
            f"mean length {metrics['mean_length']:.1f} tokens, {metrics['unparseable']} unparseable)")


def _train_cfg():
    from sae_training.config import TrainSAEConfig

    return TrainSAEConfig


def _train_run():
    from sae_training.report import train_and_report

    return train_and_report


def _attribute_cfg():
    from .jobs_config import AttributeJobConfig

    return AttributeJobConfig


def _attribute_run():
    from .jobs import run_attribute

    def run(cfg):
        for line in _attribute_lines(run_attribute(cfg)):
            print(f"{line} -> {cfg.run_dir}/")
    return run


def _attribute_lines(summaries: dict) -> list[str]:
    lines = []
    for method, summary in summaries.items():
        top = ", ".join(f"L{layer}:{latent}" for layer, latent in summary["selection"][:8])
        delta = summary.get("delta_median")
        extra = f", median completeness gap {delta:.2e}" if isinstance(delta, float) else ""
        if summary.get("mean_nodes"):
            extra += f", {summary['mean_nodes']:.1f} nodes per prompt"
        if summary.get("n_budget_hit"):
            extra += f" ({summary['n_budget_hit']} prompts hit the node budget above delta_tol)"
        lines.append(f"{method}: top latents {top}{extra}")
    return lines


def _evaluate_cfg():
    from .jobs_config import EvaluateJobConfig

    return EvaluateJobConfig


def _evaluate_run():
    from .jobs import run_evaluate

    def run(cfg):
        _, report = run_evaluate(cfg)
        print(f"report: {report}")
    return run


def _pipeline_cfg():
    from .experiments.pipeline_config import PipelineConfig

    return PipelineConfig


def _pipeline_run():
    from .experiments.pipeline import run_pipeline

    def run(cfg):
        from sae_training.report import report as sae_report

        results = run_pipeline(cfg)
        print(f"sample: {_sample_line(results['sample'])}")
        if "loaded" not in results["sae"]:
            print("sae: " + sae_report(results["sae"]).replace("\n", "\n     "))
        for line in _attribute_lines(results["attribute"]):
            print(f"attribute: {line}")
        print(f"report: {results['evaluate']['report']}")
        explain = results["explain"]
        if explain.get("enabled", True):
            print(f"explain: {explain['n_latents']} latents (the explorer's full panels) in "
                  f"{explain['seconds']:.0f} s; the feature table with their explanations: {explain['table']}")
        print(f"explorer: {results['explore']['explorer']} (open it in a browser; no server needed)")
    return run


def _explore_cfg():
    from .jobs_config import ExploreJobConfig

    return ExploreJobConfig


def _explore_run():
    from .jobs import run_explore

    return lambda cfg: print(f"explorer: {run_explore(cfg)} (open it in a browser; no server needed)")


def _explain_cfg():
    from .explain_config import ExplainJobConfig

    return ExplainJobConfig


def _explain_run():
    from .explain_run import run_explain

    def run(cfg):
        summary = run_explain(cfg)
        top = summary["groups_mean"].get("ipg_top", {})
        print(f"explained {summary['n_latents']} latents in {summary['seconds']:.0f} s; IPG's top {top.get('n')}: "
              f"detection {top.get('detection_bacc')}, output percentile {top.get('output_percentile')}")
        print(f"explanations: {cfg.run_dir}/explanations (rerun `ipg-sae explore {cfg.run_dir}` to show them)")
    return run


def _export_cfg():
    from .jobs_config import ExportJobConfig

    return ExportJobConfig


def _export_run():
    from .jobs import run_export

    def run(cfg):
        out = run_export(cfg)
        print(f"exported: {out['exported']}")
        if "residual" in out:
            print(f"checked through sae-lens's SAETransformerBridge at {out['hook']}: residual max |diff| "
                  f"{out['residual']:.3g}, activations max |diff| {out['activations']:.3g}")
        print("load it: bridge = sae_lens.SAETransformerBridge.boot_transformers(MODEL, hf_model=model, "
              f"tokenizer=tok); sae = sae_lens.SAE.load_from_disk({out['exported']!r}); "
              "bridge.run_with_cache_with_saes(ids, saes=[sae])  (or ipg_sae.export.transformer_lens_bridge)")
    return run


def _study_cfg():
    from .experiments.study.config import StudyConfig

    return StudyConfig


def _study_run():
    from .experiments.study import run_study

    def run(cfg):
        results = run_study(cfg)
        for reward, text in results["report"]["answer"].items():
            print(f"{reward}: {text}")
        print(f"report: {results['report']['report']}")
    return run


def _paths_cfg():
    from .experiments.origins.config import PathsConfig

    return PathsConfig


def _paths_run():
    from .experiments.origins import run_paths

    def run(cfg):
        results = run_paths(cfg)
        print(results["report"]["answer"])
        print(f"report: {results['report']['report']}")
    return run


def _bench_cfg():
    from .experiments.steering_bench.config import SteeringBenchConfig

    return SteeringBenchConfig


def _bench_run():
    from .experiments.steering_bench import run_bench

    def run(cfg):
        results = run_bench(cfg)
        print(results["report"]["answer"])
        print(f"report: {results['report']['report']}")
    return run


def _steer_cfg():
    from .experiments.steering_bench.apply_config import SteerApplyConfig

    return SteerApplyConfig


def _steer_run():
    from .experiments.steering_bench.apply import run_apply

    def run(cfg):
        out = run_apply(cfg)
        e = out["effect"]
        print(f"{out['label']}: {cfg.reward} {e[0] * 100:+.1f} [{e[1] * 100:+.1f}, {e[2] * 100:+.1f}] points against "
              f"no steering on {len(out['problems'])} problems; helped {out['helped'] * 100:.0f}%, hurt "
              f"{out['hurt'] * 100:.0f}%")
        print(f"results: {cfg.run_dir / 'apply.json'}")
    return run


COMMANDS: dict[str, Command] = {
    "sample": ("sample completions of a task and score them", _sample_cfg, _sample_run),
    "train-sae": ("train SAEs on a model's residual stream", _train_cfg, _train_run),
    "attribute": ("attribute rewards to SAE latents with IPG (and baselines)", _attribute_cfg, _attribute_run),
    "evaluate": ("steer with selected latents and compare against random sets", _evaluate_cfg, _evaluate_run),
    "pipeline": ("sample -> SAE -> attribute -> select -> evaluate -> report", _pipeline_cfg, _pipeline_run),
    "study": ("does the selection matter? every method and a matched null, off-policy, on held-out samples",
              _study_cfg, _study_run),
    "paths": ("where IPG's path starts: zero vs mean origin, integrated vs local, against single-latent removals",
              _paths_cfg, _paths_run),
    "steering-bench": ("steering that helps? IPG-based recipes vs DiffMean, prompting and the baselines, on-policy",
                       _bench_cfg, _bench_run),
    "steer": ("apply a shipped steering recipe (a bench/recipes folder) on-policy to a task or JSONL file, paired "
              "with the unsteered run", _steer_cfg, _steer_run),
    "explore": ("write a static page showing what each latent is and how it moves the outcome",
                _explore_cfg, _explore_run),
    "explain": ("explain and score latents with no LLM (n-grams, VocabProj, TokenChange; optionally an LLM)",
                _explain_cfg, _explain_run),
    "export": ("copy an SAE for TransformerLens / sae-lens's SAETransformerBridge and check it loads exactly",
               _export_cfg, _export_run),
}
STARTS_OVER = {"sample", "explore", "export", "steer"}  # commands that keep no partial work when stopped
# Commands whose positional argument is a directory (a config field) rather than a config file.
RUN_DIR_COMMANDS = {"explore": ("run_dir", "RUN_DIR", "the run directory (e.g. runs/demo)"),
                    "explain": ("run_dir", "RUN_DIR", "the run directory (e.g. runs/demo)"),
                    "export": ("sae", "SAE_DIR", "the SAE directory (e.g. runs/demo/sae/layer_15)"),
                    "steer": ("recipe", "RECIPE_DIR", "a recipe folder (e.g. runs/steering_bench/bench/recipes/"
                              "ipg_step)")}  # their positional argument is a run directory, not a config file


class Parser(argparse.ArgumentParser):
    """argparse, plus a "did you mean" for a mistyped flag."""

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for p in a.choices.values()]
            flags = [o for parser in parsers for action in parser._actions for o in action.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s subparser gets its config flags (the others are listed, not loaded)."""
    from . import __version__

    parser = Parser(prog="ipg-sae", description="Explain and control LLM reasoning through SAE "
                    "features with Integrated Policy Gradient.")
    parser.add_argument("--version", action="version", version=f"ipg-sae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (help_text, cfg_cls, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        if name in RUN_DIR_COMMANDS:
            _, metavar, help_text = RUN_DIR_COMMANDS[name]
            p.add_argument("config", metavar=metavar, help=help_text)
        else:
            p.add_argument("config", nargs="?", help="YAML config file (defaults are used when omitted)")
        p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        p.add_argument("--verify", action="store_true",
                       help="hash every input and output file afresh (ignore the digest memo of unchanged files)")
        from .config import add_config_flags

        add_config_flags(p, cfg_cls())
    return parser


def command_named(argv: list[str]) -> str | None:
    """The subcommand in ``argv`` (its first word that is not a flag); a mistyped one is an error with the
    closest command name, before anything heavy is imported."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in COMMANDS:
        return word
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(COMMANDS)}"
    build_parser().error(f"unknown command {word!r} ({hint})")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_named(argv))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _, cfg_cls, runner = COMMANDS[args.command]
    if args.command in RUN_DIR_COMMANDS:  # `ipg-sae explore runs/demo`: the directory is a field
        setattr(args, f"cfg:{RUN_DIR_COMMANDS[args.command][0]}", args.config)
        args.config = None
    from .command import run_job

    # The runner (and torch with it) is imported only once the config has loaded: a config file's typo or a bad
    # value is reported without it.
    return run_job(args, cfg_cls(), lambda cfg: runner()(cfg), resumes=args.command not in STARTS_OVER)
