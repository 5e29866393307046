"""Tokenizer and chat template agree with transformers' AutoTokenizer."""

from __future__ import annotations

import pytest

from gpu_runtime.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello, world! How are you today?"}]


@pytest.mark.parametrize("variant", ["llama-gqa", "opt"])
def test_matches_autotokenizer(variant, model_dirs):
    from transformers import AutoTokenizer

    ours = Tokenizer(model_dirs[variant])
    ref = AutoTokenizer.from_pretrained(model_dirs[variant])
    text = "The quick brown fox jumps over the lazy dog. def add(a, b):"
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    prompt = ours.apply_chat_template(MESSAGES)
    assert prompt == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert ours.encode_chat(MESSAGES) == ours.encode(prompt, add_special_tokens=False)
    assert ours.eos_token_id == ref.eos_token_id


def test_missing_template_is_a_clear_error(tmp_path, model_dirs):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dirs["opt"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(d).apply_chat_template(MESSAGES)


def test_a_template_that_fails_on_the_messages_is_an_input_error(tmp_path, model_dirs):
    import json
    import shutil

    from gpu_runtime.errors import RuntimeInputError

    d = tmp_path / "m"
    shutil.copytree(model_dirs["opt"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0].content.nope() }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeInputError, match="chat template failed") as info:
        Tokenizer(d).apply_chat_template(MESSAGES)
    assert info.value.param == "messages"
