"""Train SAEs on a causal LM's residual stream with sae-lens's ``SAETrainer``.

Activations come from our own forward hooks on Hugging Face models (no TransformerLens),
in deterministic chunks that can be cached on disk; training is resumable from
checkpoints and data-parallel under ``torchrun``. The saved SAEs are sae-lens SAEs that
``ipg_sae.saes.load_sae`` splices into the model.

    from sae_training import TrainSAEConfig, train
    summary = train(TrainSAEConfig(name="demo", layers=[15]))

or ``python -m sae_training configs/sae_smollm2.yaml [--field.x value ...] [--no-wandb]``.
"""

from ipg_sae.lazy import lazy_exports

from .config import DataConfig, TrainSAEConfig

# ``train`` loads on first use: importing the config (``ipg-sae train-sae --help``, a config's typo) stays
# torch-free, and ``from sae_training import train`` works as before.
__getattr__, __dir__ = lazy_exports(__name__, {"train": "trainer"})


__all__ = ["DataConfig", "TrainSAEConfig", "train"]
