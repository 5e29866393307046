"""Converts a Llama-family GGUF file (llama.cpp's format) into a standard Hugging Face
checkpoint directory, so that the store, the planner and the runtime see an ordinary checkpoint.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2", dtype="float32")

writes config.json, safetensors (sharded with an index above ``shard_bytes``), tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json. Quantised tensors
(Q8_0, Q4_0, Q4_1) and F16/BF16/F32 ones are dequantised with the ``gguf`` library; the result is
stored in ``dtype``. float32 is the default because every supported GGUF type dequantises to
values float32 holds exactly: the checkpoint computes what the GGUF file means, no second
rounding. (bfloat16 halves the size and adds a rounding of its own.)

llama.cpp's converter permutes the rows of each q/k projection for its RoPE layout (rotating
interleaved pairs instead of the two halves of each head); ``unpermute`` undoes that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_runtime.config import DTYPES
from gpu_runtime.errors import UnsupportedModelError
from gpu_runtime.gguf_tokenizer import GGUFVocab, build_tokenizer, tokenizer_config

DEFAULT_DTYPE = "float32"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
ARCHITECTURES = ("llama",)  # general.architecture; Mistral and SmolLM GGUFs say "llama" too
DEFAULT_SHARD_BYTES = 2 * 2**30
# GGUF tensor names -> HF names; {i} is the layer
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


class GGUFImportError(UnsupportedModelError):
    """A GGUF file this converter cannot turn into a checkpoint (``param`` names the key)."""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFImportError("reading GGUF files needs the 'gguf' package: "
                              ".venv/bin/pip install gguf", "gguf") from None
    return gguf


@dataclass(frozen=True, slots=True)
class GGUFModel:
    """What the converter read from one file: the HF config and the tokenizer metadata."""

    config: dict
    vocab: GGUFVocab
    chat_template: str | None


def read_metadata(reader: Any) -> GGUFModel:
    """The HF ``config.json`` and the tokenizer metadata of an open ``gguf.GGUFReader``."""
    meta = _Fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{ARCHITECTURES}", "general.architecture")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFImportError("this GGUF bakes Llama 3.1 RoPE scaling into rope_freqs.weight, "
                              "which the converter does not read back yet", "rope_freqs")
    vocab = _vocab(meta)
    config = _config(meta, arch, vocab, names)
    return GGUFModel(config, vocab, meta.get("tokenizer.chat_template"))


class _Fields:
    def __init__(self, reader: Any) -> None:
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        if key not in self.fields:
            raise GGUFImportError(f"the GGUF file has no {key!r}; a Llama GGUF written by "
                                  "llama.cpp's converter has it", key)
        return self.fields[key].contents()


def _vocab(meta: _Fields) -> GGUFVocab:
    tokens = meta.need("tokenizer.ggml.tokens")
    return GGUFVocab(
        model=meta.need("tokenizer.ggml.model"), pre=meta.get("tokenizer.ggml.pre", "default"),
        tokens=tokens, token_types=meta.get("tokenizer.ggml.token_type", [1] * len(tokens)),
        merges=meta.get("tokenizer.ggml.merges", []),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        eot_token_id=meta.get("tokenizer.ggml.eot_token_id"),
        unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", False)))


def _config(meta: _Fields, arch: str, vocab: GGUFVocab, names: set[str]) -> dict:
    hidden, heads = meta.need(f"{arch}.embedding_length"), meta.need(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFImportError(f"partial RoPE ({rope_dim} of {head_dim} head dims) is not "
                              "supported", f"{arch}.rope.dimension_count")
    config: dict = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta.need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.need(f"{arch}.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim, "max_position_embeddings": meta.need(f"{arch}.context_length"),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": meta.get(f"{arch}.vocab_size", len(vocab.tokens)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False,
        "bos_token_id": vocab.bos_token_id, "eos_token_id": vocab.eos_token_id,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(meta.need(f"{arch}.rope.scaling.factor"))}
    elif scaling != "none":
        raise GGUFImportError(f"RoPE scaling {scaling!r} is not supported yet; supported: "
                              "none, linear", f"{arch}.rope.scaling.type")
    return config


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; raises GGUFImportError for one we do not map."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        if pattern in TENSOR_NAMES:
            return TENSOR_NAMES[pattern].format(i=parts[1])
    elif gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    raise GGUFImportError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; known: "
                          f"{sorted(TENSOR_NAMES)}", "tensors")


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: within each head it stored the rows as
    interleaved (even, odd) pairs; HF keeps the first half of the head, then the second."""
    rows = w.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows for {num_heads} heads"
    half = rows // num_heads // 2
    # (heads, half, 2, ...) -> (heads, 2, half, ...): pair members go back to the two halves
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any, config: dict) -> np.ndarray:
    """One GGUF tensor as float32 in HF layout (rows = output features)."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFImportError(f"tensor {tensor.name!r} is {kind}; supported: {SUPPORTED_TYPES}"
                              " (requantise the file with llama-quantize to one of those)",
                              "tensors")
    # a copy: an F32 tensor comes back as a read-only view of the memory-mapped file
    w = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if ".attn_q." in tensor.name:
        w = unpermute(w, config["num_attention_heads"])
    elif ".attn_k." in tensor.name:
        w = unpermute(w, config["num_key_value_heads"])
    return w


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = DEFAULT_DTYPE,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes the HF checkpoint of ``gguf_file`` to ``out_dir``; returns ``out_dir``."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r}; allowed {tuple(DTYPES)}", "dtype")
    reader = _gguf().GGUFReader(str(gguf_file))
    model = read_metadata(reader)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(reader, model.config, out, DTYPES[dtype], shard_bytes)
    write_text_files(model, out, dtype)
    return out


def write_weights(reader: Any, config: dict, out: Path, dtype: torch.dtype,
                  shard_bytes: int) -> None:
    """Safetensors in ``dtype``, one shard in memory at a time."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[Any]] = [[]]
    size = 0
    for t in reader.tensors:
        nbytes = int(np.prod(t.shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {hf_name(t.name): torch.from_numpy(dequantize(t, config)).to(dtype)
                   for t in shard}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, fname)
        total += sum(x.numel() * x.element_size() for x in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_text_files(model: GGUFModel, out: Path, dtype: str) -> None:
    """config.json, tokenizer.json, tokenizer_config.json and generation_config.json."""
    config = model.config | {"torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(model.vocab).save(str(out / "tokenizer.json"))
    tok_config = tokenizer_config(model.vocab, model.chat_template,
                                  config["max_position_embeddings"])
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(model.vocab),
                                                           indent=2))


def generation_config(vocab: GGUFVocab) -> dict:
    """BOS/EOS/pad ids; EOS lists end-of-turn too, as llama.cpp stops on either."""
    eos = [i for i in dict.fromkeys((vocab.eos_token_id, vocab.eot_token_id)) if i is not None]
    config: dict = {"bos_token_id": vocab.bos_token_id,
                    "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if vocab.pad_token_id is not None:
        config["pad_token_id"] = vocab.pad_token_id
    return config
