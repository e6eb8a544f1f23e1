"""What an attribution run was made from, so that another job can reuse it only when it fits.

An experiment that attributes writes ``provenance.json`` beside the attribution (:func:`write_provenance`): the
problems attributed on (id and question), the SAEs' identity (the digests of their files' contents, or a
published SAE's release and id) and the reward's identity (:attr:`ipg_sae.rewards.Reward.identity`: its name and
code). A job that reuses the attribution (the steering benchmark's ``attribution_dir``) reads it back
(:func:`read_provenance`) and refuses a run made on its evaluation problems, with other SAEs or another reward.
"""

from __future__ import annotations

from pathlib import Path

from .digest import tree_digest
from .errors import IPGError
from .io import read_json, write_json
from .saes import SAESpec
from .tasks import TaskConfig, load_problems
from .trajectories import load_trajectories

PROVENANCE_FILE = "provenance.json"
FORMAT = "ipg-sae-provenance/1"


def sae_identity(specs: list[SAESpec]) -> list:
    """The SAEs by content: a local folder's file digests (by name inside it), a published SAE's spec."""
    out = []
    for spec in specs:
        if spec.path and Path(spec.path).exists():
            root = Path(spec.path)
            files = tree_digest([root])
            out.append({str(Path(f).relative_to(root)) if root.is_dir() else root.name: d for f, d in files.items()})
        else:
            out.append({k: v for k, v in vars(spec).items() if k != "path"} | {"path": spec.path})
    return out


def write_provenance(root: Path, task: TaskConfig, saes: list[SAESpec], reward_identity: dict) -> Path:
    """``root/provenance.json`` for the attribution of ``root/trajectories.jsonl`` (the problems it holds)."""
    attributed = {t.prompt_id for t in load_trajectories(root / "trajectories.jsonl")}
    problems = [{"id": p.id, "question": p.question} for p in load_problems(task) if p.id in attributed]
    path = root / PROVENANCE_FILE
    write_json(path, {"format": FORMAT, "problems": problems, "saes": sae_identity(saes), "reward": reward_identity})
    return path


def read_provenance(root: Path, field: str) -> dict:
    """The provenance of the attribution under ``root``; ``field`` is the config field that named it."""
    path = Path(root) / PROVENANCE_FILE
    try:
        doc = read_json(path)
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("problems"), list):
        raise IPGError(f"{field} {root} has no readable {PROVENANCE_FILE} (which problems, SAEs and reward it was made "
                       "from), so it cannot be checked: rerun the attribute stage of the job that made it, or leave "
                       f"{field} empty to attribute here")
    return doc
