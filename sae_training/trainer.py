"""Train SAEs on a causal LM's residual stream with sae-lens's ``SAETrainer``.

``train(cfg)`` builds one sae-lens training SAE and one ``SAETrainer`` per requested layer
and drives them in lockstep through the trainer's public seams (``step``,
``maybe_reset_sparsity``, ``build_train_step_log_dict``, ``save_checkpoint``,
``load_trainer_state``), the way sae-lens's own ``MultiSAETrainer`` does, on batches from
:mod:`sae_training.activations` (our HF hooks; no TransformerLens model). Driving the loop
here, rather than calling ``fit()``, is what gives step-based checkpoints, a data position
equal to the step count, and evaluation of the LM with the SAE spliced in.

Outputs under ``runs/<name>/``: ``checkpoints/`` (while training), ``sae/layer_<L>/`` (final
SAEs in sae-lens inference format, loadable by ``sae_lens.SAE.load_from_disk`` and
``ipg_sae.saes.load_sae``), ``sae_eval.json``, ``train_sae_config.yaml`` and ``wandb/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ipg_sae.config import dump_yaml, to_dict
from ipg_sae.errors import IPGError
from ipg_sae.io import read_json, run_lock, write_json, write_text
from ipg_sae.models import check_layer, hidden_size, load_model, model_fingerprint
from ipg_sae.saes import write_sae_sidecar
from ipg_sae.tracking import Tracker, artifact_name

from . import checkpoints, distributed
from .activations import ActivationCache, ActivationSource, ActivationStream, inliers, model_key
from .config import TrainSAEConfig
from .data import build_rows, check_context_size, split_rows
from .evaluate import EvalReference, evaluate, reference, wandb_metrics
from .saes import build_trainers

log = logging.getLogger(__name__)

# Settings that do not change what is trained: they may differ between a run and its resume.
_RESUME_FREE = {"name", "runs_dir", "lm_batch_size", "cache_activations", "cache_dir", "checkpoint_every",
                "eval_every", "log_every", "max_steps", "device", "threads", "wandb"}


def train(cfg: TrainSAEConfig) -> dict:
    """Train (or resume) one SAE per layer of ``cfg.layers`` on the model's residual stream.

    A rerun of the same config resumes from the last checkpoint under ``runs/<name>/checkpoints``
    and ends at the same step as an uninterrupted run. Under ``torchrun`` the SAE is trained
    data-parallel (every rank runs the LM on its own shard of the data).

    Args:
        cfg: the run (model, layers, architecture, data, token budget, checkpoints, W&B).

    Returns:
        A summary dict: ``finished``, ``step``, ``total_steps``, ``run_dir``, ``sae_dirs``
        (layer -> the saved sae-lens directory), ``layers`` (layer -> evaluation metrics:
        explained variance, L0, dead fraction, CE loss recovered, ...) and ``throughput``.
        Empty on ranks other than 0.
    """
    cfg.validate()
    check_context_size(cfg)
    owns_group = not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    d = distributed.setup(cfg.model.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with run_lock(cfg.run_dir):
            return _Run(cfg, d).run()
    finally:
        torch.set_num_threads(threads)
        if owns_group:
            distributed.shutdown(d)


class _Run:
    def __init__(self, cfg: TrainSAEConfig, d: distributed.Dist):
        self.cfg, self.d = cfg, d
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.sae_root = self.run_dir / "sae"
        self.eval_path = self.run_dir / "sae_eval.json"
        self.tracker: Tracker | None = None
        self.ref: EvalReference | None = None

    # ---- setup ----------------------------------------------------------------------

    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        self.t_start = time.time()
        if self.eval_path.exists():
            raise IPGError(f"run {self.run_dir} is already finished ({self.eval_path.name} exists) and is never "
                           "overwritten; pick a new `name` or delete that directory")
        if cfg.batch_size_tokens % d.world_size:
            raise IPGError(f"batch_size_tokens ({cfg.batch_size_tokens}) must divide evenly over {d.world_size} "
                           "processes; change it or the process count")
        torch.manual_seed(cfg.seed)
        model_cfg = dataclasses.replace(cfg.model, device=distributed.model_device_for(d, cfg.model.device))
        self.model, self.tokenizer = load_model(model_cfg)
        for layer in cfg.layers:
            check_layer(self.model, layer)
        self.layers = sorted(cfg.layers)
        self.d_model = hidden_size(self.model)
        self.sae_device = cfg.device or str(next(self.model.parameters()).device)

        rows = build_rows(cfg, self.tokenizer, model_fingerprint(self.model, self.tokenizer))
        self.train_rows, self.eval_rows = split_rows(rows, cfg.n_eval_sequences)
        cache = None
        if cfg.cache_activations:
            root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.runs_dir) / "activation_cache"
            cache = ActivationCache(root, model_key(self.model, self.tokenizer), cfg.cache_dtype)
        self.source = ActivationSource(self.model, self.train_rows, self.layers, cfg.chunk_sequences,
                                       cfg.lm_batch_size, cfg.cache_dtype, cache)
        self.batch = cfg.batch_size_tokens // d.world_size
        self.stream = ActivationStream(self.source, self.batch, cfg.buffer_chunks, cfg.seed, cfg.shuffle,
                                       d.rank, d.world_size, cfg.max_norm_ratio)
        self.trainers = build_trainers(cfg, self.model, self.layers, self.batch, self.sae_device)
        start = self._restore_or_initialize()
        for trainer in self.trainers.values():
            distributed.wrap_ddp(trainer.sae, d)
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "train_sae_config.yaml", dump_yaml(cfg))
            self.tracker = Tracker(cfg.wandb, self.run_dir, cfg.name, "train-sae", config=to_dict(cfg))
            if cfg.data.source == "trajectories":
                self.tracker.use(artifact_name("trajectories", cfg.data.path), "dataset", cfg.data.path)
        summary = {}
        try:
            summary = self._train(start)
            return summary
        finally:
            if self.tracker is not None:  # a run stopped early keeps its W&B run id for the resume
                self.tracker.finish(completed=bool(summary.get("finished")))

    def _settings(self) -> dict:
        full = to_dict(self.cfg)
        out = {k: v for k, v in full.items() if k not in _RESUME_FREE and k != "model"}
        out["model"] = {k: full["model"][k] for k in ("name", "dtype", "revision")}
        return out

    def _restore_or_initialize(self) -> int:
        path = checkpoints.latest(self.ckpt_root)
        if path is not None:
            step = checkpoints.load(path, self.trainers, self.d, self._settings())
            log.info("resuming from %s (step %d of %d)", path, step, self.cfg.total_steps)
            return step
        if self.cfg.from_pretrained_path is None:
            self._initialize_from_data()
        return 0

    @torch.no_grad()
    def _initialize_from_data(self) -> None:
        """Input scaling (to norm sqrt(d)) and b_dec (the mean input) from the first block of data."""
        cfg = self.cfg
        if not (cfg.normalize_activations or cfg.init_b_dec_to_mean):
            return
        block = self.stream.load_block(0)  # kept by the stream: step 0 reuses it
        stats = {}
        if self.d.main:
            for layer, acts in block.items():
                x = acts[:65536].float()
                x = x[inliers(x, cfg.max_norm_ratio)]
                scale = math.sqrt(self.d_model) / x.norm(dim=-1).mean().item() if cfg.normalize_activations else None
                stats[layer] = (scale, (x * (scale or 1.0)).mean(0))
        # One process's statistics for all (DDP also broadcasts the parameters from process 0).
        stats = self.d.broadcast_object(stats)
        for layer, trainer in self.trainers.items():
            scale, mean = stats[layer]
            trainer.activation_scaler.scaling_factor = scale
            if cfg.init_b_dec_to_mean:
                trainer.sae.b_dec.data.copy_(mean.to(trainer.sae.b_dec))

    # ---- training loop --------------------------------------------------------------

    def _train(self, start: int) -> dict:
        cfg, d = self.cfg, self.d
        total = cfg.total_steps
        stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
        multi = len(self.layers) > 1
        t0 = time.time()
        pbar = tqdm(total=total, initial=start, unit="step", desc=f"train-sae {cfg.name}", disable=not d.main,
                    dynamic_ncols=True)
        batches = self.stream.batches(start) if start < stop else iter(())
        step = start
        for step in range(start + 1, stop + 1):
            batch = next(batches)
            logs: dict = {}
            losses = {}
            for layer, trainer in self.trainers.items():
                prefix = f"layer_{layer}/" if multi else ""
                sparsity = trainer.maybe_reset_sparsity()
                out = trainer.step(batch[layer].to(torch.float32))
                losses[layer] = out.loss.item()
                if step % cfg.log_every == 0:
                    train_log = train_batch_keys(trainer.build_train_step_log_dict(out, step * cfg.batch_size_tokens))
                    train_log["details/n_training_tokens"] = step * cfg.batch_size_tokens
                    logs.update({prefix + k: v for k, v in train_log.items()})
                logs.update({prefix + k: v for k, v in sparsity.items()})
            for trainer in self.trainers.values():
                trainer.n_training_steps += 1
            elapsed = time.time() - t0
            done_tokens = (step - start) * cfg.batch_size_tokens
            pbar.update(1)
            if step % cfg.log_every == 0 or step == stop:
                pbar.set_postfix(tok_s=f"{done_tokens / max(elapsed, 1e-9):,.0f}",
                                 loss=f"{sum(losses.values()) / len(losses):.4g}", refresh=False)
            if logs and self.tracker is not None:
                logs["details/tokens_per_second"] = done_tokens / max(elapsed, 1e-9)
                self.tracker.log(logs, step=step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop:
                self._checkpoint(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                self._evaluate_training(step)
        pbar.close()
        wall = time.time() - t0
        throughput = {
            "train_steps": step - start,
            "train_tokens": (step - start) * cfg.batch_size_tokens,
            "train_seconds": wall,
            "tokens_per_second": (step - start) * cfg.batch_size_tokens / max(wall, 1e-9),
            "lm_tokens": self.source.lm_tokens * d.world_size,  # (about: processes' shares can differ a little)
            "outliers_dropped": self.stream.dropped * d.world_size,
        }
        if stop < total:
            if step > start or checkpoints.latest(self.ckpt_root) is None:
                self._checkpoint(step)  # the loop never checkpoints the step it stops at
            return {"finished": False, "step": step, "total_steps": total, "run_dir": str(self.run_dir),
                    "resumed_from": start, "throughput": throughput}
        if step > start or checkpoints.latest(self.ckpt_root) is None:
            self._checkpoint(total)  # a kill during the final save or evaluation resumes here, not from scratch
        return self._finish(start, throughput)

    def _checkpoint(self, step: int) -> None:
        checkpoints.save(self.ckpt_root, step, self.trainers, self.d, {"settings": self._settings(),
                                                                       "tokens": step * self.cfg.batch_size_tokens})

    def _scales(self) -> dict[int, float | None]:
        return {layer: t.activation_scaler.scaling_factor for layer, t in self.trainers.items()}

    def _evaluate_training(self, step: int) -> None:
        if self.d.main:
            metrics = self._eval({layer: t.sae for layer, t in self.trainers.items()}, self._scales())
            if self.tracker is not None:
                self.tracker.log(self._wandb_metrics(metrics), step=step)
            log.info("step %d: %s", step, _summary(metrics))
        self.d.barrier()

    def _eval(self, saes: dict, scales: dict) -> dict[int, dict]:
        if self.ref is None:
            self.ref = reference(self.model, self.eval_rows, self.layers, self.cfg.lm_batch_size,
                                 self.cfg.max_norm_ratio)
        return evaluate(self.model, saes, self.eval_rows, self.ref, self.cfg.lm_batch_size, scales)

    # ---- final outputs --------------------------------------------------------------

    def _finish(self, start: int, throughput: dict) -> dict:
        cfg, d = self.cfg, self.d
        dead = {}
        for layer, trainer in self.trainers.items():
            trainer.set_final_sae_metadata()
            # A latent is dead only if it did not fire on any process's data.
            since_fired = d.all_min(trainer.n_forward_passes_since_fired)
            dead[layer] = (since_fired > cfg.dead_feature_window).float().mean().item()
            sae = trainer.sae
            if trainer.activation_scaler.scaling_factor is not None:
                # The saved SAE reads raw residuals: fold the training-time input scaling into its weights.
                sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
                trainer.activation_scaler.scaling_factor = None
        result: dict = {}
        if d.main:
            sae_dirs = {layer: self._save_sae(layer, trainer.sae) for layer, trainer in self.trainers.items()}
            from ipg_sae.saes import load_sae

            loaded = {layer: load_sae(str(path), self.model) for layer, path in sae_dirs.items()}
            metrics = self._eval(loaded, {})
            for layer in metrics:
                metrics[layer]["dead_fraction"] = dead[layer]
            summary = {
                "name": cfg.name,
                "model": cfg.model.name,
                "architecture": cfg.architecture,
                "steps": cfg.total_steps,
                "training_tokens": cfg.total_steps * cfg.batch_size_tokens,
                "resumed_from_step": start,
                "world_size": d.world_size,
                "dead_feature_window_tokens": cfg.dead_feature_window * cfg.batch_size_tokens,
                "n_eval_sequences": len(self.eval_rows),
                "throughput": {**throughput, "total_seconds": time.time() - self.t_start},
                "layers": {str(layer): m for layer, m in metrics.items()},
                "sae_dirs": {str(layer): str(p) for layer, p in sae_dirs.items()},
            }
            write_json(self.eval_path, summary)
            self._log_final(metrics, sae_dirs)
            log.info("finished: %s", _summary(metrics))
            result = {"finished": True, "run_dir": str(self.run_dir), **summary}
        d.barrier()
        return result

    def _save_sae(self, layer: int, sae) -> Path:
        """Write the inference SAE to ``sae/layer_<L>/`` atomically; an existing one is kept as is."""
        final = self.sae_root / f"layer_{layer}"
        if (final / "cfg.json").is_file():
            return final  # written by a run killed after saving: the same weights, never overwritten
        tmp = self.sae_root / f".layer_{layer}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with checkpoints.partial_dir(tmp, final):
            sae.save_inference_model(str(tmp))
            write_sae_sidecar(tmp, model_name=self.cfg.model.name, layer=layer)
        os.replace(tmp, final)
        return final

    def _wandb_metrics(self, metrics: dict[int, dict]) -> dict[str, float]:
        """Every layer's evaluation under sae-lens keys (``layer_<L>/``-prefixed with several layers)."""
        multi = len(self.layers) > 1
        return {k: v for layer, m in metrics.items()
                for k, v in wandb_metrics(m, f"layer_{layer}/" if multi else "").items()}

    def _log_final(self, metrics: dict, sae_dirs: dict) -> None:
        if self.tracker is None:
            return
        flat = self._wandb_metrics(metrics)
        self.tracker.log(flat, step=self.cfg.total_steps)
        self.tracker.summary(flat)
        for layer, path in sae_dirs.items():
            m = metrics.get(layer, {})
            self.tracker.artifact(artifact_name("sae", path), "model", path, metadata={
                "layer": layer, "hook": f"{self.cfg.model.name} block {layer} output", "d_sae": self._d_sae(path),
                "architecture": self.cfg.architecture, "k": self.cfg.k, "training_tokens": self.cfg.training_tokens,
                **{f"heldout_{k}": m[k] for k in ("explained_variance", "l0", "ce_loss_score", "dead_fraction") if k in m}})

    @staticmethod
    def _d_sae(path) -> int | None:
        cfg = read_json(Path(path) / "cfg.json")
        return cfg.get("d_sae")


def train_batch_keys(log: dict) -> dict:
    """sae-lens's ``metrics/<name>`` (measured on the training batch just stepped on) renamed
    ``metrics/train_batch_<name>``: the run's summary holds the held-out evaluation too
    (``reconstruction_quality/heldout_explained_variance``, :func:`~sae_training.evaluate.wandb_metrics`), and
    the two explained variances (~0.87 on the batch, ~0.90 held out) must not look alike."""
    return {(f"metrics/train_batch_{k.removeprefix('metrics/')}" if k.startswith("metrics/") else k): v
            for k, v in log.items()}


def _summary(metrics: dict) -> str:
    return "; ".join(
        f"layer {layer}: EV {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, CE recovered {m['ce_loss_score']:.3f}"
        + (f", dead {m['dead_fraction']:.3f}" if "dead_fraction" in m else "")
        for layer, m in metrics.items())


def read_eval(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "sae_eval.json")
