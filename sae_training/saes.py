"""Build sae-lens training SAEs and their ``SAETrainer``s from a :class:`TrainSAEConfig`.

Each SAE records where it reads: ``metadata.hook_name`` is the HF module path of the
decoder block (``model.layers.15``, ``transformer.h.3``), the residual stream that
``ipg_sae.saes`` splices at; ``model_name``, ``context_size`` and the data are recorded too.
W&B logging is done by the training loop, so the trainers' own logger is switched off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ipg_sae.errors import IPGError
from ipg_sae.models import decoder_layers, hidden_size, hub_id, weights_source

from .config import TrainSAEConfig


def blocks_path(model) -> str:
    """The module path of the model's decoder blocks, e.g. ``model.layers``."""
    blocks = decoder_layers(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise IPGError(f"cannot name the decoder blocks of {type(model).__name__}")


def data_description(cfg: TrainSAEConfig) -> str:
    data = cfg.data
    if data.source == "task":
        levels = data.task_levels or [data.task.level]
        return f"task:{data.task.name}:levels={levels}:n={data.task.n_problems}:seed={data.task.seed}"
    return f"{data.source}:{data.path or data.dataset}"


def build_sae(cfg: TrainSAEConfig, model, layer: int, device: str):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d_in = hidden_size(model)
    d_sae = cfg.expansion_factor * d_in
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > d_sae:
        raise IPGError(f"k={cfg.k} exceeds the SAE width {d_sae} (expansion_factor {cfg.expansion_factor} x d_model "
                       f"{d_in}); lower k or raise expansion_factor")
    metadata = SAEMetadata(
        model_name=hub_id(cfg.model.name) or cfg.model.name,  # the hub id when known: what other tools load
        hook_name=f"{blocks_path(model)}.{layer}",
        hook_head_index=None,
        model_class_name="AutoModelForCausalLM",
        context_size=cfg.context_size,
        prepend_bos=False,
        exclude_first_token=True,
        dataset_path=data_description(cfg),
        model_from_pretrained_kwargs={},
        # The hub id above is what other tools boot; this says which weights the residuals really came from.
        model_weights_source=weights_source(cfg.model.name),
    )
    pretrained = cfg.from_pretrained_path is not None
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device=device, metadata=metadata,
                  normalize_activations="expected_average_only_in" if cfg.normalize_activations and not pretrained
                  else "none")
    torch.manual_seed(cfg.seed * 1000 + layer)  # a fixed initialization per layer
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, **common))
    elif cfg.architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient,
                                                              **common))
    elif cfg.architecture == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=cfg.l0_coefficient, **common))
    if pretrained:
        _load_pretrained(sae, cfg, layer, d_in)
    return sae.to(device)


def _load_pretrained(sae, cfg: TrainSAEConfig, layer: int, d_in: int) -> None:
    """Start from the weights of a saved SAE (sae-lens format), after checking it fits."""
    root = Path(cfg.from_pretrained_path).expanduser()
    path = root / f"layer_{layer}" if (root / f"layer_{layer}" / "cfg.json").is_file() else root
    if not (path / "cfg.json").is_file():
        raise IPGError(f"from_pretrained_path {root} has no cfg.json (nor layer_{layer}/cfg.json); "
                       "give a directory saved in sae-lens format")
    if path == root and len(cfg.layers) > 1:
        raise IPGError(f"from_pretrained_path {root} holds one SAE but {len(cfg.layers)} layers are trained; "
                       "give a directory with one layer_<L>/ SAE per layer")
    saved = json.loads((path / "cfg.json").read_text())
    if saved.get("d_in") != d_in:
        raise IPGError(f"the SAE in {path} has d_in {saved.get('d_in')} but the model's hidden size is {d_in}: "
                       "it was trained for a different model; pick an SAE of this model or drop from_pretrained_path")
    if saved.get("d_sae") != sae.cfg.d_sae:
        raise IPGError(f"the SAE in {path} has d_sae {saved.get('d_sae')} but expansion_factor {cfg.expansion_factor} "
                       f"gives {sae.cfg.d_sae}; set expansion_factor to {saved.get('d_sae', 0) // d_in}")
    if saved.get("architecture") != cfg.architecture:
        raise IPGError(f"the SAE in {path} is a {saved.get('architecture')!r} SAE but architecture is "
                       f"{cfg.architecture!r}; set architecture to match")
    if saved.get("normalize_activations", "none") != "none":
        raise IPGError(f"the SAE in {path} normalizes its inputs ({saved['normalize_activations']}); "
                       "only SAEs that read raw residuals can be fine-tuned")
    try:
        state = load_file(str(path / "sae_weights.safetensors"))
        sae.process_state_dict_for_loading(state)
        sae.load_state_dict(state)
    except Exception as e:
        raise IPGError(f"could not load the weights in {path} ({str(e).splitlines()[0][:160]}); "
                       "is it a complete sae-lens SAE directory?") from None


def build_trainers(cfg: TrainSAEConfig, model, layers: list[int], batch_size: int, device: str) -> dict:
    """One sae-lens ``SAETrainer`` per layer; ``batch_size`` is this process's share of a batch."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.total_steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10,
        lr_scheduler_name=cfg.lr_scheduler,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        device=device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(1000, cfg.dead_feature_window),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    return {layer: SAETrainer(cfg=trainer_cfg, sae=build_sae(cfg, model, layer, device), data_provider=iter(()))
            for layer in layers}
