"""Worker for the sharding test: ``python -m torch.distributed.run --nproc_per_node N tests/_attr_worker.py MODEL OUT METHOD``.

Builds the same SAEs and trajectories as ``tests/test_attribution.py::_shard_inputs`` and runs
``attribute`` with ``out_dir=OUT``; every rank returns the merged result, which it checks.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.simplefilter("ignore")


def main() -> None:
    from ipg_sae import distributed
    from ipg_sae.attribution import AttributionResult, attribute
    from ipg_sae.models import load_model
    from tests.helpers import shard_inputs

    model_dir, out_dir, method = sys.argv[1], sys.argv[2], sys.argv[3]
    model, tok = load_model(model_dir, dtype="float64")
    saes, trajs = shard_inputs()
    rank, world = distributed.init_distributed()
    result = attribute(model, saes, trajs, n_steps=4, baseline=method, tokenizer=tok, out_dir=out_dir,
                       progress=False, token_maps=["p1/s2"])
    saved = AttributionResult.load(out_dir)
    assert saved.prompt_ids == result.prompt_ids and saved.meta["world_size"] == world
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main()
