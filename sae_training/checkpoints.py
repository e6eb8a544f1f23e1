"""Resumable training state in ``runs/<name>/checkpoints/step_<N>/``, written atomically.

Each layer's part is sae-lens's own checkpoint (``SAETrainer.save_checkpoint``: SAE
weights and cfg, feature sparsity, ``trainer_state.pt`` with the optimizer, LR scheduler,
step counters and firing statistics, and the activation scaler), so nothing of the
trainer state is re-implemented here. With several processes, processes other than 0
add their own firing statistics under ``rank_<r>/`` (they decide which latents the
auxiliary loss revives, and differ per process).

A checkpoint is written into a hidden ``.step_<N>.partial`` directory, ``state.json`` last,
then renamed into place, so ``step_<N>`` directories are always complete; only the newest
is kept. ``state.json`` records the step (which is also the data position, see
:mod:`sae_training.activations`) and the settings that shape training, so a restart
with a different config is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

from ipg_sae.errors import IPGError
from ipg_sae.io import read_json, write_json

from .distributed import Dist

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, if any."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file())
    return done[-1] if done else None


@contextlib.contextmanager
def partial_dir(tmp: Path, final: Path, clean: bool = True):
    """Around the writing of the hidden folder ``tmp`` that becomes ``final``: on a failure the partial folder is
    removed, and a full disk (which torch.save reports as a bare RuntimeError naming no file) becomes an
    ``OSError(ENOSPC)`` naming ``final``, which the command line prints as one line."""
    try:
        yield
    except BaseException as e:
        full = _disk_full(e, tmp)
        if clean:
            shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(e, KeyboardInterrupt):
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from None
        raise


def _disk_full(e: BaseException, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e):
        return True
    try:
        return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(where.parent).free < 1 << 20
    except OSError:
        return False


def save(root: Path, step: int, trainers: dict, d: Dist, state: dict) -> Path:
    """Write the checkpoint of ``step`` (every process must call this)."""
    final = checkpoint_dir(root, step)
    tmp = root / f".{final.name}.partial"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while checkpointing
        tmp.mkdir(parents=True)
    d.barrier()
    with partial_dir(tmp, final, clean=d.main):
        for layer, trainer in trainers.items():
            if d.main:
                trainer.save_checkpoint(checkpoint_name=f"layer_{layer}", base_path=tmp)
            else:
                trainer.save_trainer_state(tmp / f"rank_{d.rank}" / f"layer_{layer}")
        d.barrier()
        if d.main:
            write_json(tmp / STATE_FILE, {**state, "step": step, "world_size": d.world_size})
    if d.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in root.glob("step_*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load(path: Path, trainers: dict, d: Dist, settings: dict) -> int:
    """Restore every trainer from checkpoint ``path``; returns its step."""
    root = path.parent
    state_file = path / STATE_FILE
    try:
        state = read_json(state_file)
        step = int(state["step"])
    except Exception as e:
        raise _corrupt(state_file, root, e) from None
    _check_settings(state.get("settings", {}), settings, path)
    if state.get("world_size", 1) != d.world_size:
        raise IPGError(f"checkpoint {path} was written by {state.get('world_size')} processes but this run has "
                       f"{d.world_size}; resume with the same number of processes, or delete {root} to start over")
    for layer, trainer in trainers.items():
        layer_dir = path / f"layer_{layer}"
        state_dir = layer_dir if d.main else path / f"rank_{d.rank}" / f"layer_{layer}"
        _guard(lambda: trainer.sae.load_weights_from_checkpoint(layer_dir), layer_dir / "sae_weights.safetensors", root)
        _guard(lambda: trainer.load_trainer_state(state_dir), state_dir / "trainer_state.pt", root)
        if trainer.n_training_steps != step:
            raise _corrupt(state_dir / "trainer_state.pt", root,
                           ValueError(f"it is at step {trainer.n_training_steps}, state.json says {step}"))
    return step


def _guard(fn, file: Path, root: Path) -> None:
    try:
        fn()
    except IPGError:
        raise
    except Exception as e:
        raise _corrupt(file, root, e) from None


def _corrupt(file: Path, root: Path, e: Exception) -> IPGError:
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return IPGError(f"checkpoint file {file} is missing or corrupt ({detail}); delete {root} to restart the run "
                    "from the beginning")


def _check_settings(saved: dict, now: dict, path: Path) -> None:
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise IPGError(f"checkpoint {path} was written with {key}={saved.get(key)!r} but the config now says "
                           f"{key}={now.get(key)!r}; restore that setting to resume, or delete {path.parent} "
                           "(or pick a new name) to start over")
