"""The one config of an SAE training run (``TrainSAEConfig``), loaded strictly from YAML.

Every field has a default, so ``python -m sae_training`` with no file trains the default
TopK SAE on the offline default model's middle layer. ``validate`` checks what can be
checked without loading the model (layers against the model happen in the trainer).

Token counts: ``training_tokens`` and ``batch_size_tokens`` count residual positions the
SAE trains on (first-token and padding positions are excluded), summed over all processes.
The run takes ``training_tokens // batch_size_tokens`` optimizer steps; the data position
is the step count, which is what makes resuming exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ipg_sae.config import JobConfig
from ipg_sae.errors import IPGError
from ipg_sae.tasks import TaskConfig

Architecture = Literal["topk", "batchtopk", "standard", "jumprelu"]


@dataclass
class DataConfig:
    # text: a `datasets` dataset (`dataset` hub name or `path` local json/jsonl/parquet/csv/txt file);
    # task: prompts + worked solutions from ipg_sae.tasks; trajectories: a trajectories.jsonl (`path`).
    source: Literal["text", "task", "trajectories"] = "task"
    path: str | None = None
    dataset: str | None = None  # hub dataset name (text source)
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int = 0  # read at most this many documents (0 = as many as the token budget needs)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(n_problems=500))
    task_levels: list[int] = field(default_factory=list)  # arithmetic: mix these levels (empty = task.level)
    pack: bool = True  # concatenate documents into full context_size rows (False: one padded row each)
    # Problems the SAE must never see: a document holding one of their questions (compared as splits.question_key)
    # is left out of the corpus. A job that trains its SAE as a stage adds every problem set it samples or
    # evaluates on (its attribution, held-out, dev, test and transfer splits).
    exclude_tasks: list[TaskConfig] = field(default_factory=list)


@dataclass
class TrainSAEConfig(JobConfig):
    name: str = "sae"
    layers: list[int] = field(default_factory=lambda: [15])  # residual layers (decoder block outputs), one SAE each

    # SAE
    architecture: Architecture = "topk"
    expansion_factor: int = 4  # d_sae = expansion_factor * d_model
    k: int = 32  # topk / batchtopk: active latents per token (batchtopk: on average)
    aux_loss_coefficient: float = 1.0  # topk / batchtopk: dead-latent auxiliary loss
    l1_coefficient: float = 5.0  # standard
    l0_coefficient: float = 1.0  # jumprelu
    normalize_activations: bool = True  # scale inputs to norm sqrt(d) while training; folded into the saved SAE
    init_b_dec_to_mean: bool = True
    from_pretrained_path: str | None = None  # start from this sae-lens SAE directory (or one with layer_<L>/ in it)

    # optimisation
    lr: float = 3e-4
    lr_scheduler: Literal["constant", "cosineannealing"] = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0  # linear decay to 0 over the last steps
    lr_end: float | None = None  # cosine floor (default lr / 10)
    dead_feature_window: int = 200  # steps without firing after which a latent counts as dead

    # data and activations
    data: DataConfig = field(default_factory=DataConfig)
    training_tokens: int = 1_000_000  # residual positions to train on, over all processes
    context_size: int = 256  # tokens per LM row
    batch_size_tokens: int = 4096  # positions per optimizer step
    lm_batch_size: int = 8  # sequences per LM forward
    chunk_sequences: int = 32  # sequences per activation chunk: the unit of caching
    buffer_chunks: int = 4  # chunks shuffled together
    shuffle: bool = True
    max_norm_ratio: float = 10.0  # drop positions whose residual norm exceeds this x the batch median (0 = keep all)
    cache_activations: bool = False
    cache_dir: str | None = None  # default: <runs_dir>/activation_cache
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    # checkpoints, evaluation, logging
    checkpoint_every: int = 500  # steps; 0 = no periodic checkpoints
    eval_every: int = 0  # steps; 0 = only at the end
    n_eval_sequences: int = 16  # held-out sequences for the evaluation
    log_every: int = 10
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps; a rerun resumes
    seed: int = 0  # SAE init and data order
    device: str | None = None  # SAE device; None = the model's device
    threads: int | None = None  # CPU threads for torch (None = torch's default; 1 helps on a busy shared machine)

    @property
    def total_steps(self) -> int:
        return self.training_tokens // self.batch_size_tokens

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            raise IPGError("`layers` is empty; list the residual layers to train SAEs on, e.g. layers: [15]")
        if len(set(self.layers)) != len(self.layers):
            raise IPGError(f"`layers` {self.layers} lists a layer twice; list each layer once")
        positive = ("expansion_factor", "k", "context_size", "batch_size_tokens", "lm_batch_size", "chunk_sequences",
                    "buffer_chunks", "n_eval_sequences", "log_every", "dead_feature_window")
        for name in positive:
            if getattr(self, name) < 1:
                raise IPGError(f"`{name}` is {getattr(self, name)}; it must be at least 1")
        if self.max_norm_ratio < 0 or 0 < self.max_norm_ratio <= 1:
            raise IPGError(f"`max_norm_ratio` is {self.max_norm_ratio}; use a ratio above 1 (e.g. 10) or 0 to keep all")
        if self.lr <= 0:
            raise IPGError(f"`lr` is {self.lr}; it must be positive")
        if self.context_size < 2:
            raise IPGError(f"`context_size` is {self.context_size}; it must be at least 2 (the first token is skipped)")
        if self.training_tokens < self.batch_size_tokens:
            raise IPGError(f"training_tokens ({self.training_tokens}) is smaller than one batch "
                           f"(batch_size_tokens {self.batch_size_tokens}); raise training_tokens or lower the batch size")
        if self.lr_warm_up_steps + self.lr_decay_steps > self.total_steps:
            raise IPGError(f"lr_warm_up_steps + lr_decay_steps ({self.lr_warm_up_steps} + {self.lr_decay_steps}) "
                           f"exceed the {self.total_steps} training steps; shorten them")
        if self.threads is not None and self.threads < 1:
            raise IPGError(f"`threads` is {self.threads}; give a positive thread count or null")
        if self.max_steps is not None and self.max_steps < 1:
            raise IPGError(f"`max_steps` is {self.max_steps}; give a positive step count or null")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise IPGError(f"`{name}` is {getattr(self, name)}; use a step count, or 0 to turn it off")
        data = self.data
        if data.source == "text" and bool(data.path) == bool(data.dataset):
            raise IPGError("data.source 'text' needs exactly one of data.path (a local file) or data.dataset (a hub name)")
        if data.source == "trajectories" and not data.path:
            raise IPGError("data.source 'trajectories' needs data.path: the trajectories.jsonl written by `ipg-sae sample`")
        if data.max_documents < 0:
            raise IPGError(f"data.max_documents is {data.max_documents}; use 0 for no limit")
