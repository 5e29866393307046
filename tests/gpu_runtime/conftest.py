"""Shared fixtures: small random checkpoints (made once per session), a transformers reference
for greedy generation, and the device the runtime is tested on (``HYDRA_TEST_DEVICE``: cpu by
default, cuda or cuda:N on a machine with a GPU; tests that take ``runtime_device`` are skipped
when the device asked for is absent)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from gpu_runtime.checkpoint import CheckpointIndex, index_checkpoint
from gpu_runtime.demo_model import DemoModelSpec, make_demo_model
from gpu_runtime.prefetch import PrefetchConfig, Prefetcher
from gpu_runtime.store.server import running

# init_std 0.2 keeps greedy argmax margins clear; with 0.02 logits are nearly flat and float
# rounding could flip ties between implementations that are both right
PROMPTS = [[1, 17, 42, 99, 250, 7, 8, 300, 12, 5, 77], [1, 400], [3, 9, 27, 81, 243, 500, 11]]
STD = 0.2
FOUR_LAYERS = ("num_hidden_layers", 4)
WINDOW = 5  # sliding window of the windowed variants: below every prompt + 12 new tokens
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

VARIANTS: dict[str, DemoModelSpec] = {
    "llama-gqa": DemoModelSpec("llama", init_std=STD, overrides=(FOUR_LAYERS,)),
    "llama-mha": DemoModelSpec("llama", init_std=STD, seed=1,
                               overrides=(("num_key_value_heads", 4),)),
    "llama-tied": DemoModelSpec("llama", init_std=STD, seed=2, tie_word_embeddings=True),
    "llama-rope-linear": DemoModelSpec("llama", init_std=STD, seed=3, overrides=(
        ("rope_scaling", {"rope_type": "linear", "factor": 4.0}), ("rope_theta", 500.0))),
    "llama-rope-llama3": DemoModelSpec("llama", init_std=STD, seed=4,
                                       overrides=(("rope_scaling", LLAMA3_ROPE),)),
    "opt": DemoModelSpec("opt", init_std=STD, seed=5, overrides=(FOUR_LAYERS,)),
    "opt-proj": DemoModelSpec("opt", init_std=STD, seed=6,
                              overrides=(("word_embed_proj_dim", 32),)),
    "opt-untied": DemoModelSpec("opt", init_std=STD, seed=7, tie_word_embeddings=False),
    "llama-sharded": DemoModelSpec("llama", init_std=STD, seed=8, shard_bytes=40_000,
                                   overrides=(FOUR_LAYERS,)),
    # Qwen2 ties its embeddings (as Qwen2.5-0.5B); Qwen3's head_dim 32 is not hidden 64 / 4
    # heads; Mistral's window and the windowed Qwen2's (sliding on layers 2 and 3 only) are
    # shorter than prompt + output, so the window hides keys in prefill and in decode
    "qwen2": DemoModelSpec("qwen2", init_std=STD, seed=9, overrides=(FOUR_LAYERS,)),
    "qwen2-window": DemoModelSpec("qwen2", init_std=STD, seed=10, overrides=(
        FOUR_LAYERS, ("use_sliding_window", True), ("sliding_window", WINDOW),
        ("max_window_layers", 2))),
    "qwen3": DemoModelSpec("qwen3", init_std=STD, seed=11, tie_word_embeddings=False,
                           overrides=(FOUR_LAYERS, ("head_dim", 32))),
    "mistral": DemoModelSpec("mistral", init_std=STD, seed=12,
                             overrides=(FOUR_LAYERS, ("sliding_window", WINDOW))),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_demo_model(root / name, spec) for name, spec in VARIANTS.items()}


@pytest.fixture(scope="session")
def runtime_device() -> str:
    """Where the engine under test runs (and its transformers reference): ``HYDRA_TEST_DEVICE``,
    default cpu."""
    name = os.environ.get("HYDRA_TEST_DEVICE", "cpu").strip() or "cpu"
    device = torch.device(name)  # raises on a name torch does not know
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"HYDRA_TEST_DEVICE={name}: this machine has no CUDA device")
        if (device.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"HYDRA_TEST_DEVICE={name}: only {torch.cuda.device_count()} devices")
    elif device.type != "cpu":
        pytest.fail(f"HYDRA_TEST_DEVICE={name}; allowed cpu, cuda or cuda:N")
    return name


@pytest.fixture(scope="session")
def hf_models():
    """Loaded transformers models, cached per (dir, dtype, device)."""
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        key = (str(model_dir), dtype, device)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            cache[key] = model.to(device).eval()
        return cache[key]

    return get


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int,
              eos_ids: tuple[int, ...] = ()) -> tuple[list[int], list[float]]:
    """Greedy tokens and log-softmax of each chosen token, with the HF KV cache; stops at EOS.
    Runs on ``model``'s device."""
    device = model.device
    ids = torch.tensor([prompt], device=device)
    out = model(ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(float(lp[token]))
        if token in eos_ids:
            break
        out = model(torch.tensor([[token]], device=device), use_cache=True, **_cache_kwarg(out))
    return tokens, logprobs


def eos_of(model_dir: Path) -> tuple[int, ...]:
    from gpu_runtime.config import load_config

    return load_config(model_dir).eos_token_ids


def _cache_kwarg(out) -> dict:
    # transformers 5 renamed ``past_key_values`` to ``cache``; accept both
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@pytest.fixture
def make_prefetcher():
    """Builds prefetchers with unique pool files; closes them (and removes the pools) after."""
    made: list[Prefetcher] = []

    def make(**kwargs) -> Prefetcher:
        kwargs.setdefault("pool_bytes", 32 << 20)
        kwargs.setdefault("node_id", f"test-{uuid.uuid4().hex[:8]}")
        pf = Prefetcher(PrefetchConfig(**kwargs))
        made.append(pf)
        return pf

    yield make
    for pf in made:
        pf.close()
        assert pf.pool.mm.closed  # no view left behind: the pool's pages are given back


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    """A store root holding ``small/`` (bf16, about 7.9 MB in 5 shards), shared by the store
    and prefetch tests."""
    root = tmp_path_factory.mktemp("store")
    make_demo_model(root / "small", DemoModelSpec(size="small", dtype="bfloat16",
                                                  shard_bytes=2_000_000))
    return root


@pytest.fixture(scope="session")
def ckpt_index(ckpt_root) -> CheckpointIndex:
    return index_checkpoint(f"file://{ckpt_root / 'small'}")


@pytest.fixture
def store_server(ckpt_root):
    with running(ckpt_root) as server:
        yield server
