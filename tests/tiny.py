"""Tiny random-weight models and a tiny trained tokenizer, built offline.

Models are built from a config, saved with ``save_pretrained`` and loaded back through
``ipg_sae.models.load_model`` so the real loading code runs. The tokenizer is a small
byte-level BPE trained here on arithmetic text, with a ChatML chat template, so
prompt formatting goes through the same ``apply_chat_template`` path as real models.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have? 3 + 5 = 8. The answer is 8.",
    "Sara had 12 pencils and gave away 4. 12 - 4 = 8. The answer is 8.",
    "A box holds 6 rows of 7 eggs. 6 * 7 = 42. The answer is 42.",
    "Solve the problem. Finish with 'The answer is N.' Wait, let me check. So therefore the total is 19.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 -3 1/2 0.5 1,000 \\boxed{7} #### 9",
    "user assistant system You are a helpful assistant. Question: Answer:",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def build_model(kind: str, out_dir: str | Path, vocab_size: int, seed: int = 0, **overrides):
    """Build a tiny ``kind`` in {llama, qwen2, gpt2, gemma3} model with random weights and save it."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8,
                               **common)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    # Scale weights up a little so random models have peaked, input-dependent outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(out_dir)
    return out_dir


def random_sae(arch: str, d_in: int, layer: int, d_sae: int = 96, k: int = 8, seed: int = 0,
               model_name: str | None = None):
    """A random sae-lens SAE of architecture ``arch`` in {standard, topk, jumprelu} for residual ``layer``."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"model.layers.{layer}", model_name=model_name)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    elif arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.fill_(0.5)
            elif name in ("b_enc",):
                p.normal_(0, 0.5).sub_(1.0)  # negative bias: sparse codes for standard/jumprelu
            elif name == "b_dec":
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 1.0 / d_in**0.5)
    return sae


def sample_tiny(model_dir, n_problems: int, n_samples: int, max_new_tokens: int,
                reward: str = "tests.helpers:text_length_mod_7"):
    """``(model, tokenizer, trajectories)``: a tiny model loaded from ``model_dir`` and its samples of the first
    ``n_problems`` arithmetic problems (no few-shot example)."""
    from ipg_sae.models import load_model
    from ipg_sae.sampling import SamplingConfig, sample
    from ipg_sae.tasks import TaskConfig, build_prompts, load_problems

    model, tok = load_model(str(model_dir))
    task = TaskConfig(n_problems=n_problems, few_shot=0)
    problems = load_problems(task)
    trajs = sample(model, tok, problems, build_prompts(tok, problems, task),
                   SamplingConfig(n_samples=n_samples, max_new_tokens=max_new_tokens), reward, progress=False)
    return model, tok, trajs
