"""A model whose weights hold inf is refused by name before it samples, and non-finite logits met while sampling
are one line naming the model (issue 36, item 18)."""

from __future__ import annotations

import shutil

import pytest
import torch

from ipg_sae.errors import IPGError


@pytest.fixture
def inf_model_dir(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "inf-model"
    shutil.copytree(tiny_llama_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, name


def test_a_model_with_an_inf_weight_is_refused_by_name(inf_model_dir):
    from ipg_sae.models import load_model

    d, name = inf_model_dir
    with pytest.raises(IPGError, match=rf"model '{d}': its weight {name} holds inf values") as err:
        load_model(str(d))
    assert "\n" not in str(err.value)


def test_sample_on_that_model_is_one_line_and_exit_2(inf_model_dir, tmp_path, capsys):
    from ipg_sae.cli import main

    d, _ = inf_model_dir
    code = main(["sample", "--name", "x", "--runs_dir", str(tmp_path / "runs"), "--model.name", str(d),
                 "--task.n_problems", "2", "--task.few_shot", "0", "--sampling.n_samples", "2",
                 "--sampling.max_new_tokens", "4", "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "holds inf values" in err and str(d) in err


@pytest.mark.parametrize("backend, temperature", [("hf", 0.7), ("loop", 0.7), ("hf", 0.0), ("loop", 0.0)])
def test_non_finite_logits_while_sampling_name_the_model(tiny_llama_dir, backend, temperature):
    """Sampling fails with a traceback on them (hf: torch.multinomial; loop: an index error); greedy decoding emits
    token 0 silently."""
    from ipg_sae.models import load_model
    from ipg_sae.sampling import SamplingConfig, sample
    from ipg_sae.tasks import TaskConfig, build_prompts, load_problems

    model, tok = load_model(str(tiny_llama_dir))
    with torch.no_grad():  # overflowed after loading (a steering hook or a half-precision overflow does the same)
        model.lm_head.weight[0, 0] = float("inf")
    task = TaskConfig(n_problems=2, few_shot=0)
    problems = load_problems(task)
    with pytest.raises(IPGError, match="gave non-finite logits"):
        sample(model, tok, problems, build_prompts(tok, problems, task),
               SamplingConfig(n_samples=2 if temperature else 1, temperature=temperature, max_new_tokens=4,
                              backend=backend), "correctness", progress=False)
