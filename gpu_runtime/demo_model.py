"""Random-weight checkpoints in the standard Hugging Face layout, for demos, tests and benchmarks.

No model hub is reachable from our machines, so every model we serve in a demo or a test is made
here: ``config.json``, one or several ``*.safetensors`` files (with ``model.safetensors.index.json``
when sharded), ``tokenizer.json`` (a byte-level BPE trained on a small built-in text) and
``tokenizer_config.json`` with a chat template. The tensor names are the Hugging Face ones, so
``transformers`` loads these checkpoints as it would a real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpu_runtime.config import ARCHITECTURES as CONFIG_ARCHITECTURES
from gpu_runtime.config import DTYPES

ARCHITECTURES = tuple(CONFIG_ARCHITECTURES.values())  # the short names DemoModelSpec takes

SIZES = ("tiny", "small", "1b")

LLAMA_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                  max_position_embeddings=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
               max_position_embeddings=2048),
}
OPT_SIZES = {
    "tiny": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=512, max_position_embeddings=512, word_embed_proj_dim=64),
    "small": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                  vocab_size=2048, max_position_embeddings=1024, word_embed_proj_dim=256),
    "1b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
               vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
}

CORPUS = """
Serverless functions start when a request arrives and stop when the traffic goes away.
A large language model is a function too: it reads a prompt and writes tokens one at a time.
The first request after a quiet hour finds no running copy, so the platform must fetch the
weights, load them onto a device and run the prompt before the first token can leave.
Splitting the model into pipeline stages lets several machines download their parts at once.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
def add(a, b):\n    return a + b\n\nclass Cache:\n    pass\n
Hello, world! How are you today? I am fine, thank you. What is the weather like?
""" * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True, slots=True)
class DemoModelSpec:
    arch: str = "llama"
    size: str = "tiny"
    dtype: str = "float32"
    seed: int = 0
    init_std: float = 0.02
    tie_word_embeddings: bool | None = None
    shard_bytes: int | None = None  # split weights into several files of about this size
    overrides: tuple[tuple[str, object], ...] = ()  # extra config.json keys (rope_scaling, ...)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r} is not one of {ARCHITECTURES}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {SIZES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}")


def llama_config(spec: DemoModelSpec) -> dict:
    tie = bool(spec.tie_word_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": spec.dtype, **LLAMA_SIZES[spec.size], **dict(spec.overrides),
    }


# Llama-shaped architectures: what their config.json adds to (or changes in) a Llama one, as
# released checkpoints write it. Small Qwen models tie their embeddings; Qwen3's head_dim is its
# own (here twice hidden / heads, as Qwen3-0.6B has 128 for 1024 / 16); sliding windows are off
# (Qwen's use_sliding_window false, Mistral v0.2+'s null window) unless ``overrides`` set them.
LLAMA_LIKE = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": None},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": None},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None},
}


def llama_like_config(spec: DemoModelSpec) -> dict:
    """config.json of a Qwen2, Qwen3 or Mistral demo checkpoint."""
    size = LLAMA_SIZES[spec.size]
    tie = spec.arch != "mistral" if spec.tie_word_embeddings is None else spec.tie_word_embeddings
    config = llama_config(spec) | LLAMA_LIKE[spec.arch] | {"tie_word_embeddings": tie}
    if spec.arch == "qwen3":
        config["head_dim"] = 2 * size["hidden_size"] // size["num_attention_heads"]
    else:  # Qwen2's q/k/v biases are fixed, Mistral has none: no such key
        del config["attention_bias"]
    config |= dict(spec.overrides)
    if spec.arch != "mistral":  # no layer slides unless an override sets use_sliding_window
        config.setdefault("max_window_layers", config["num_hidden_layers"])
    return config


def opt_config(spec: DemoModelSpec) -> dict:
    tie = True if spec.tie_word_embeddings is None else spec.tie_word_embeddings
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
        "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": tie, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        "dropout": 0.0, "attention_dropout": 0.0, "torch_dtype": spec.dtype,
        **OPT_SIZES[spec.size], **dict(spec.overrides),
    }


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-family checkpoint, with Qwen2's q/k/v biases and Qwen3's
    q/k norms where ``c`` is one of those."""
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    model_type = c["model_type"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if model_type == "qwen2" or c.get("attention_bias"):
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if model_type != "qwen2" and c.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if model_type == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (head_dim,),
                       p + "self_attn.k_norm.weight": (head_dim,)}
    shapes["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def opt_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, f, v, e = c["hidden_size"], c["ffn_dim"], c["vocab_size"], c["word_embed_proj_dim"]
    d = "model.decoder."
    shapes: dict[str, tuple[int, ...]] = {
        d + "embed_tokens.weight": (v, e),
        d + "embed_positions.weight": (c["max_position_embeddings"] + 2, h),
    }
    if e != h:
        shapes[d + "project_in.weight"] = (h, e)
    for i in range(c["num_hidden_layers"]):
        p = f"{d}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (h, h), p + f"self_attn.{proj}.bias": (h,)}
        shapes |= {
            p + "self_attn_layer_norm.weight": (h,), p + "self_attn_layer_norm.bias": (h,),
            p + "fc1.weight": (f, h), p + "fc1.bias": (f,),
            p + "fc2.weight": (h, f), p + "fc2.bias": (h,),
            p + "final_layer_norm.weight": (h,), p + "final_layer_norm.bias": (h,),
        }
    shapes |= {d + "final_layer_norm.weight": (h,), d + "final_layer_norm.bias": (h,)}
    if e != h:
        shapes[d + "project_out.weight"] = (e, h)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, e)
    return shapes


CONFIGS = {"llama": llama_config, "qwen2": llama_like_config, "qwen3": llama_like_config,
           "mistral": llama_like_config, "opt": opt_config}
assert set(CONFIGS) == set(ARCHITECTURES), f"demo configs {set(CONFIGS)} != {ARCHITECTURES}"


def random_tensor(name: str, shape: tuple[int, ...], spec: DemoModelSpec,
                  gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.1 * x  # not exactly one, so a misplaced norm shows up in parity tests
    elif name.endswith("norm.bias"):
        x = 0.1 * x
    else:
        x = spec.init_std * x
    return x.to(DTYPES[spec.dtype]).contiguous()


def build_tokenizer(arch: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"] if arch != "opt" else ["<s>", "<pad>", "</s>", "<unk>"]
    bos = "<s>" if arch != "opt" else "</s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    return tok, bos


def make_demo_model(out_dir: str | Path, spec: DemoModelSpec = DemoModelSpec()) -> Path:
    """Writes a random-weight checkpoint for ``spec`` into ``out_dir`` and returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[spec.arch](spec)
    shapes = opt_shapes(config) if spec.arch == "opt" else llama_shapes(config)
    gen = torch.Generator().manual_seed(spec.seed)
    tensors = {name: random_tensor(name, shape, spec, gen) for name, shape in shapes.items()}
    _save_weights(out, tensors, spec.shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok, bos = build_tokenizer(spec.arch, min(config["vocab_size"], 1024))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": config["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2))
    return out


def _save_weights(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if not shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map |= {name: fname for name in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
