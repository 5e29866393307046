"""A random Llama built in memory on a device, for ``bench/tpot.py --shape``: transformers
makes it (its own init, on the device), and our engine's stage aliases the same tensors, so the
two sides run the same weights with one copy of them and no checkpoint files (13 GB of a 7B
model would take much of a short GPU run to write and read back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from gpu_runtime.demo_model import DemoModelSpec, llama_config
from gpu_runtime.engine import EngineConfig, LLMEngine

if TYPE_CHECKING:
    from bench.tpot import BenchConfig


class _TensorSize(NamedTuple):  # what split_stages reads of a tensor
    name: str
    length: int


def random_engine(cfg: BenchConfig, dtype: str, device: str) -> tuple[LLMEngine, Any]:
    """A random Llama of ``cfg``'s shape made by transformers on ``device`` (its own init),
    and our engine whose stage aliases the same tensors: no checkpoint files, one copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpu_runtime.config import parse_config
    from gpu_runtime.kv_cache import KVCache, KVCacheSpec
    from gpu_runtime.model_runner import LocalRunner
    from gpu_runtime.stage import build_stage, split_stages

    raw = llama_config(DemoModelSpec("llama", "small", dtype, overrides=cfg.overrides()))
    torch_dtype = getattr(torch, dtype)
    hf_config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "torch_dtype"})
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype).eval()
    tensors = {name: t.detach() for name, t in hf.state_dict().items()}
    config = parse_config(raw)
    spec = split_stages(config, [_TensorSize(n, t.nbytes) for n, t in tensors.items()], 1)[0]
    stage = build_stage(config, spec, torch_dtype, device)
    for name, t in tensors.items():
        stage.load_tensor(name, t)  # same dtype and device: the parameter is HF's tensor
    assert not stage.missing(), f"not set from transformers' model: {stage.missing()[:5]}"
    block_size = 16
    num_blocks = max(cfg.batches) * -(-(cfg.prompt_len + cfg.new_tokens + 1) // block_size) + 4
    kv = KVCache(KVCacheSpec(0, config.num_layers, num_blocks, block_size, config.num_kv_heads,
                             config.head_dim, torch_dtype), torch.device(device))
    engine_config = EngineConfig(model=f"random-llama-h{cfg.hidden_size}-l{cfg.num_layers}",
                                 dtype=dtype, device=device, block_size=block_size,
                                 num_kv_blocks=num_blocks)
    return LLMEngine.from_loaded(engine_config, [spec], kv, LocalRunner(stage, kv)), hf
