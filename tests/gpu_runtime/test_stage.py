"""Stage split: a pure function over (config, tensor index, pp)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.checkpoint import index_checkpoint
from gpu_runtime.config import parse_config
from gpu_runtime.demo_model import DemoModelSpec, llama_config, llama_shapes
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.loader import load_stage, plan_stages
from gpu_runtime.stage import split_stages


@dataclass(frozen=True)
class T:
    name: str
    length: int


def llama_index(num_layers: int, tied: bool, layer_sizes: list[int] | None = None):
    spec = DemoModelSpec("llama", tie_word_embeddings=tied,
                         overrides=(("num_hidden_layers", num_layers),))
    raw = llama_config(spec)
    tensors = []
    for name, shape in llama_shapes(raw).items():
        n = 4
        for d in shape:
            n *= d
        if layer_sizes and name.startswith("model.layers."):
            n = layer_sizes[int(name.split(".")[2])]
        tensors.append(T(name, n))
    return parse_config(raw), tensors


def test_embeddings_first_head_last_tied_on_both_ends():
    config, tensors = llama_index(4, tied=True)
    specs = split_stages(config, tensors, 2)
    assert "model.embed_tokens.weight" in specs[0].tensor_names
    assert "model.embed_tokens.weight" in specs[1].tensor_names  # tied: also the head
    assert "model.norm.weight" in specs[1].tensor_names
    assert "model.norm.weight" not in specs[0].tensor_names
    config, tensors = llama_index(4, tied=False)
    specs = split_stages(config, tensors, 2)
    assert "model.embed_tokens.weight" not in specs[1].tensor_names
    assert "lm_head.weight" in specs[1].tensor_names


def test_balances_bytes_with_uneven_layers():
    # embeddings weigh 512*64*4 = 131072 bytes on each end (untied: embed and head)
    sizes = [300_000, 10_000, 10_000, 10_000, 10_000, 300_000]
    config, tensors = llama_index(6, tied=False, layer_sizes=sizes)
    specs = split_stages(config, tensors, 3)
    assert [(s.layer_start, s.layer_end) for s in specs] == [(0, 1), (1, 5), (5, 6)]
    assert sum(s.num_bytes for s in specs) == sum(t.length for t in tensors)


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 12), pp=st.integers(1, 4), tied=st.booleans(),
       seed_sizes=st.lists(st.integers(1, 10**6), min_size=12, max_size=12))
def test_split_covers_every_layer_once_in_order(num_layers, pp, tied, seed_sizes):
    config, tensors = llama_index(num_layers, tied, seed_sizes[:num_layers])
    if pp > num_layers:
        with pytest.raises(RuntimeInputError, match=f"pp={pp}"):
            split_stages(config, tensors, pp)
        return
    specs = split_stages(config, tensors, pp)
    assert specs[0].layer_start == 0 and specs[-1].layer_end == num_layers
    for a, b in pairwise(specs):
        assert a.layer_end == b.layer_start, (a, b)
    names = [n for s in specs for n in s.tensor_names]
    shared = 1 if tied and pp > 1 else 0
    assert len(names) == len(tensors) + shared, (len(names), len(tensors))
    assert max(s.num_bytes for s in specs) == brute_force_best(specs, tensors, num_layers, pp)


def brute_force_best(specs, tensors, num_layers: int, pp: int) -> int:
    """Smallest possible largest-stage total over every way to cut the layers."""
    from itertools import combinations

    per_layer = [0] * num_layers
    for t in tensors:
        if t.name.startswith("model.layers."):
            per_layer[int(t.name.split(".")[2])] += t.length
    head = specs[0].num_bytes - sum(per_layer[specs[0].layer_start:specs[0].layer_end])
    tail = specs[-1].num_bytes - sum(per_layer[specs[-1].layer_start:specs[-1].layer_end])
    if pp == 1:
        return sum(per_layer) + head
    best = None
    for cuts in combinations(range(1, num_layers), pp - 1):
        bounds = [0, *cuts, num_layers]
        sizes = [sum(per_layer[a:b]) for a, b in pairwise(bounds)]
        sizes[0] += head
        sizes[-1] += tail
        best = max(sizes) if best is None else min(best, max(sizes))
    return best


def test_split_is_the_same_from_the_real_index(model_dirs):
    index = index_checkpoint(model_dirs["llama-sharded"].as_uri(), checksums=False)
    config = parse_config(index.config)
    specs = split_stages(config, index.tensors, 4)
    assert [len(s.layers) for s in specs] == [1, 1, 1, 1]
    config2, specs2, files = plan_stages(model_dirs["llama-sharded"], 4)
    assert specs == specs2
    assert len(set(files.values())) > 1, "the sharded checkpoint should span several files"


def test_stage_loads_only_its_tensors(model_dirs):
    config, specs, files = plan_stages(model_dirs["llama-gqa"], 2)
    import torch

    stage = load_stage(model_dirs["llama-gqa"], specs[1], config, files, torch.float32, "cpu")
    assert list(stage.model.layers) == ["2", "3"]
    assert stage.model.embed_tokens.weight.is_meta  # stage 1 of an untied model has no embedding
    assert not stage.model.lm_head.weight.is_meta
    loaded = sum(p.numel() * 4 for p in stage.parameters() if not p.is_meta)
    assert loaded == specs[1].num_bytes, (loaded, specs[1].num_bytes)


def test_load_tensor_aliases_matching_tensors(model_dirs):
    """Zero-copy contract: a tensor of the stage's dtype and device becomes the parameter."""
    import torch

    from gpu_runtime.stage import build_stage

    config, specs, _ = plan_stages(model_dirs["llama-tied"], 1)
    stage = build_stage(config, specs[0], torch.float32, "cpu")
    buf = torch.randn(config.vocab_size, config.hidden_size)
    stage.load_tensor("model.embed_tokens.weight", buf)
    assert stage.model.embed_tokens.weight.data_ptr() == buf.data_ptr()
    assert stage.model.lm_head.weight is stage.model.embed_tokens.weight  # tied
    half = torch.randn(config.hidden_size, dtype=torch.float16)
    stage.load_tensor("model.norm.weight", half)
    assert stage.model.norm.weight.dtype == torch.float32  # converted: the one allowed copy
    with pytest.raises(AssertionError, match="checkpoint shape"):
        stage.load_tensor("model.norm.weight", torch.zeros(3))
