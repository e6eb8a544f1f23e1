"""Shared pieces of the benchmarks: arguments, model builders, timing, machine info, results files.

Every benchmark compares this project against a reference *in the same process on the same
machine* and reports ratios: on a shared machine absolute times drift by tens of percent
from one minute to the next, ratios of interleaved measurements much less.

Models are built from a config with random weights (speed does not depend on weight values),
so nothing is downloaded and the same command runs on a CPU at SmolLM2-135M shapes and on a
GPU at Qwen2.5-Math-1.5B shapes. A word-level tokenizer covering the whole vocabulary stands
in for the real one (decoding any generated id works; text quality is irrelevant here).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the repository's packages, whatever the install state of the venv
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402

from ipg_sae.io import write_json  # noqa: E402
RESULTS_DIR = HERE / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model architecture at real (or tiny) sizes, plus the SAE put on it."""

    name: str
    family: str  # llama | qwen2
    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    rope_theta: float
    max_positions: int
    sae_expansion: int
    sae_k: int

    @property
    def layer(self) -> int:
        return self.n_layers // 2  # the SAE sits at a middle layer, as in the project's defaults

    @property
    def d_sae(self) -> int:
        return self.hidden * self.sae_expansion


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct), the project's offline default model.
    "smollm2-135m": Shape("smollm2-135m", "llama", 30, 576, 9, 3, 1536, 49152, True, 100000.0, 8192, 8, 32),
    # Qwen/Qwen2.5-Math-1.5B(-Instruct), the paper-scale GPU target (config written out, no download).
    "qwen2.5-math-1.5b": Shape("qwen2.5-math-1.5b", "qwen2", 28, 1536, 12, 2, 8960, 151936, True, 10000.0, 4096, 8,
                               64),
    # For --smoke: seconds on any CPU.
    "tiny": Shape("tiny", "llama", 4, 64, 4, 2, 128, 512, True, 10000.0, 4096, 4, 8),
}


def hf_config(shape: Shape):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.n_layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                  tie_word_embeddings=shape.tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if shape.family == "llama":
        cfg = LlamaConfig(rms_norm_eps=1e-5, **common)
    elif shape.family == "qwen2":
        cfg = Qwen2Config(rms_norm_eps=1e-6, use_sliding_window=False, **common)
    else:
        raise ValueError(shape.family)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": shape.rope_theta}
    cfg._name_or_path = f"random-{shape.name}"
    return cfg


def build_model(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A causal LM with random weights at ``shape``, frozen and in eval mode (as ``load_model`` returns it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def save_model_dir(model, tokenizer, out_dir: Path) -> Path:
    """Save ``model`` + ``tokenizer`` as a local HF directory (for tools that load by path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with one word per id (``w<id>``): any id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<s>")


def random_prompt(n_tokens: int, vocab: int, rng) -> str:
    return " ".join(f"w{rng.randint(3, vocab - 1)}" for _ in range(n_tokens))


def random_topk_sae(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                    layer: int | None = None):
    """A sae-lens TopK SAE with random weights at ``shape``'s width and k, reading the middle layer."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    layer = shape.layer if layer is None else layer
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"model.layers.{layer}", model_name=None)
    sae = TopKSAE(TopKSAEConfig(d_in=shape.hidden, d_sae=shape.d_sae, k=shape.sae_k, metadata=meta))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "b_dec":
                p.normal_(0, 0.01)
            elif name == "b_enc":
                p.zero_()
            else:
                p.normal_(0, 1.0 / shape.hidden ** 0.5)
    return sae.to(device=device, dtype=dtype)


def make_trajectories(n_groups: int, group_size: int, prompt_len: int, total_len: int, vocab: int, seed: int = 0):
    """``n_groups`` prompts x ``group_size`` samples of random tokens, all ``total_len`` long.

    Rewards alternate 1, 0, 1, ... inside a group so every advantage (rloo) is non-zero; with
    ``group_size`` 1 the reward is 1 (use ``advantage="none"``).
    """
    import random

    from ipg_sae.trajectories import Trajectory

    rng = random.Random(seed)
    out = []
    for p in range(n_groups):
        prompt = [rng.randint(3, vocab - 1) for _ in range(prompt_len)]
        for g in range(group_size):
            completion = [rng.randint(3, vocab - 1) for _ in range(total_len - prompt_len)]
            out.append(Trajectory(id=f"p{p}/s{g}", prompt_id=f"p{p}", sample_index=g, prompt="", completion="",
                                  reference="", prompt_ids=prompt, completion_ids=completion,
                                  reward=float((g + 1) % 2) if group_size > 1 else 1.0))
    return out


# ---- arguments ------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="model shape (random weights); default smollm2-135m, tiny with --smoke")
    parser.add_argument("--machine", default=None,
                        help="results go to results/<machine>.json (default cpu-<nproc>core or cuda-<gpu>)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (ratios use the fastest of each)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds: checks the script runs")
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.shape is None:
        args.shape = "tiny" if args.smoke else "smollm2-135m"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.machine is None:
        args.machine = default_machine(args.device) + ("-smoke" if args.smoke else "")
    args.torch_dtype = DTYPES[args.dtype]
    args.shape_obj = SHAPES[args.shape]
    return args


def default_machine(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        for junk in ("nvidia", "geforce", "pcie", "sxm5", "sxm", "80gb", "hbm3"):
            name = name.replace(junk, " ")
        return "cuda-" + "-".join(name.split())
    return f"cpu-{os.cpu_count()}core"


def child_args(args: argparse.Namespace) -> list[str]:
    """The common flags again, for a subprocess of the same benchmark."""
    out = ["--device", args.device, "--dtype", args.dtype, "--shape", args.shape, "--machine", args.machine,
           "--results-dir", args.results_dir]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.smoke:
        out.append("--smoke")
    return out


# ---- timing ---------------------------------------------------------------------------------


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device="cpu") -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device="cpu",
                log: Callable[[str], None] | None = print) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, round-robin (A B C A B C ...), after ``warmup`` rounds.

    Round-robin makes slow drifts of a shared machine hit every contender alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            times[name].append(timed(fn, device))
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summary(xs: list[float]) -> dict:
    return {"median_s": round(median(xs), 6), "min_s": round(min(xs), 6), "max_s": round(max(xs), 6),
            "runs_s": [round(x, 6) for x in xs]}


def ratio(a: list[float], b: list[float]) -> float:
    """min(a) / min(b): the best of the repeats of each.

    On a shared machine other jobs only ever add time, in bursts; the fastest repeat is the
    one least disturbed (timeit's reasoning), and medians of three repeats caught by a burst
    in different rounds give ratios off by 50%. ``ratio_median`` is recorded alongside.
    """
    return round(min(a) / min(b), 4)


def ratio_median(a: list[float], b: list[float]) -> float:
    return round(median(a) / median(b), 4)


# ---- memory ---------------------------------------------------------------------------------


def max_rss_mib() -> float:
    """Peak resident set size of this process (since ``reset_peak_rss``, on Linux).

    Linux: ``VmHWM`` of /proc/self/status, which ``reset_peak_rss`` resets (``ru_maxrss`` also
    keeps the peaks of threads that have exited, which no reset clears). Elsewhere ``ru_maxrss``
    (macOS reports bytes, Linux KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``ru_maxrss`` and ``VmHWM``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def run_child(script: Path, argv: list[str], timeout: float = 1800) -> dict:
    """Run ``script argv`` in a fresh interpreter; its last stdout line is a JSON object."""
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout,
                         cwd=str(REPO))
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(argv)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# ---- machine info and results ---------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(args: argparse.Namespace) -> dict:
    import transformers

    info = {
        "machine": args.machine,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "shape": args.shape,
        "smoke": bool(args.smoke),
        "git_commit": _git_commit(),
    }
    from importlib import metadata

    try:
        info["sae_lens"] = metadata.version("sae-lens")
    except metadata.PackageNotFoundError:
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        info["cuda"] = torch.version.cuda
    return info


def results_path(args: argparse.Namespace) -> Path:
    return Path(args.results_dir) / f"{args.machine}.json"


def write_section(args: argparse.Namespace, section: str, data: dict) -> Path:
    """Merge ``{section: data}`` into ``results/<machine>.json`` (other sections are kept)."""
    path = results_path(args)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    info = machine_info(args)
    doc["machine"] = args.machine
    doc["updated"] = info["date"]
    doc[section] = {"meta": info, **data}
    write_json(path, doc)
    print(f"wrote [{section}] to {path}")
    return path


@contextlib.contextmanager
def section_timer(name: str):
    t = time.perf_counter()
    yield
    print(f"{name}: {time.perf_counter() - t:.1f}s", flush=True)
