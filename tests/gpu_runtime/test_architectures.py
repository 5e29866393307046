"""Qwen2 / Qwen3 / Mistral: how their config.json maps onto ``ModelConfig`` (as transformers
reads it), what is rejected, and that their parameters stay one-to-one with checkpoint tensors.
Generation parity with transformers is in ``test_parity.py``."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from gpu_runtime.config import parse_config
from gpu_runtime.demo_model import DemoModelSpec, llama_like_config
from gpu_runtime.errors import UnsupportedModelError
from gpu_runtime.loader import plan_stages
from gpu_runtime.stage import build_stage, split_stages, tensor_roles

# a released Qwen2.5-7B-Instruct config.json's sliding-window keys: present, and switched off
QWEN25_WINDOW_KEYS = {"use_sliding_window": False, "sliding_window": 131072,
                      "max_window_layers": 28}


def raw(arch: str, **keys) -> dict:
    return llama_like_config(DemoModelSpec(arch, overrides=tuple(keys.items())))


def test_qwen2_has_qkv_biases_only_whatever_the_config_says():
    c = parse_config(raw("qwen2", attention_bias=False))  # transformers ignores the key too
    assert (c.arch, c.attention_bias, c.output_bias, c.mlp_bias, c.qk_norm) == (
        "qwen2", True, False, False, False)
    assert c.tie_word_embeddings and c.rope.theta == 1e6, c


def test_qwen3_norms_q_and_k_and_keeps_its_own_head_dim():
    c = parse_config(raw("qwen3", head_dim=48))
    assert (c.qk_norm, c.head_dim, c.hidden_size // c.num_heads) == (True, 48, 16), c
    assert (c.attention_bias, c.output_bias) == (False, False)
    biased = parse_config(raw("qwen3", attention_bias=True))
    assert (biased.attention_bias, biased.output_bias) == (True, True)  # all four projections


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_released_qwen_window_keys_mean_no_window(arch):
    c = parse_config(raw(arch, num_hidden_layers=32, **QWEN25_WINDOW_KEYS))
    assert (c.sliding_window, c.sliding_layers, c.window_of(31)) == (None, (), None), c


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_window_slides_from_max_window_layers_up(arch):
    c = parse_config(raw(arch, num_hidden_layers=6, use_sliding_window=True, sliding_window=64,
                         max_window_layers=4))
    assert c.sliding_layers == (4, 5), c.sliding_layers
    assert [c.window_of(i) for i in range(6)] == [None] * 4 + [64, 64]
    explicit = ["sliding_attention", "full_attention"] * 3
    c = parse_config(raw(arch, num_hidden_layers=6, use_sliding_window=True, sliding_window=64,
                         layer_types=explicit))
    assert c.sliding_layers == (0, 2, 4), c.sliding_layers


def test_mistral_slides_every_layer_when_the_window_is_set():
    assert parse_config(raw("mistral")).sliding_window is None  # v0.2+: null
    c = parse_config(raw("mistral", sliding_window=4096, num_hidden_layers=3))
    assert (c.sliding_window, c.sliding_layers) == (4096, (0, 1, 2)), c
    assert (c.attention_bias, c.output_bias, c.qk_norm) == (False, False, False)


@pytest.mark.parametrize("arch,keys,fragment,param", [
    ("mistral", {"sliding_window": 0}, "sliding_window=0", "sliding_window"),
    ("mistral", {"sliding_window": "4k"}, "'4k'", "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention",
     "layer_types"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["full_attention"]}, "2 layers", "layer_types"),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'", "rope_scaling"),
    ("qwen3", {"hidden_act": "gelu"}, "'gelu'", "model"),
])
def test_unsupported_options_are_rejected_clearly(arch, keys, fragment, param):
    with pytest.raises(UnsupportedModelError, match=fragment) as info:
        parse_config(raw(arch, **keys))
    assert info.value.param == param, info.value.param


def test_unknown_architecture_lists_the_new_ones():
    with pytest.raises(UnsupportedModelError) as info:
        parse_config({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"})
    for name in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert name in info.value.message, info.value.message


@pytest.mark.parametrize("variant", ["qwen2", "qwen2-window", "qwen3", "mistral"])
def test_parameters_alias_checkpoint_tensors_one_to_one(variant, model_dirs):
    """Every checkpoint tensor becomes (or, tied, becomes both of) the parameter(s) it maps to,
    as that very tensor (zero-copy); no parameter is left unloaded or loaded twice."""
    model_dir = model_dirs[variant]
    config, specs, files = plan_stages(model_dir, 1)
    stage = build_stage(config, specs[0], torch.float32, "cpu")
    tensors = {}
    for fname in set(files.values()):
        with safe_open(str(model_dir / fname), framework="pt", device="cpu") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    for name, tensor in tensors.items():
        stage.load_tensor(name, tensor)
    assert stage.missing() == []
    params = dict(stage.model.named_parameters(remove_duplicate=False))
    owners = {path: name for name in tensors
              for path in stage._module.param_paths(config, name)[1]}
    assert set(owners) == set(params), set(owners) ^ set(params)
    for path, name in owners.items():
        assert params[path].data_ptr() == tensors[name].data_ptr(), f"{path} copied {name}"
    if config.qk_norm:
        assert params["layers.0.self_attn.q_norm.weight"].shape == (config.head_dim,)


def test_qwen3_norms_count_as_layer_bytes_in_the_split(model_dirs):
    from gpu_runtime.checkpoint import index_checkpoint

    index = index_checkpoint(model_dirs["qwen3"].as_uri(), checksums=False)
    config = parse_config(index.config)
    roles = {name: role for name, role, _ in tensor_roles(config, index.tensors)}
    assert roles["model.layers.3.self_attn.k_norm.weight"] == "layer:3"
    specs = split_stages(config, index.tensors, 4)
    assert "model.layers.3.self_attn.q_norm.weight" in specs[3].tensor_names
    assert sum(s.num_bytes for s in specs) == index.total_bytes  # untied: nothing counted twice
