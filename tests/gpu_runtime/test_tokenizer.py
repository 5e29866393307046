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
    with pytest.raises(ValueError, match="no chat_template .neither chat_template.jinja"):
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


def copy_model(tmp_path, model_dirs, variant="llama-gqa"):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dirs[variant], d)
    return d


def edit_json(path, **changes):
    import json

    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(data | changes))


def test_chat_template_jinja_is_read_and_wins_as_in_transformers(tmp_path, model_dirs):
    """Current transformers saves the template as chat_template.jinja."""
    from transformers import AutoTokenizer

    d = copy_model(tmp_path, model_dirs)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    ours = Tokenizer(d).apply_chat_template(MESSAGES)
    assert ours.startswith("[system] Be brief.\n") and ours.endswith("[assistant]")
    ref = AutoTokenizer.from_pretrained(d)
    assert ours == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    over_network = Tokenizer.from_json((d / "tokenizer.json").read_text(), {},
                                       (d / "chat_template.jinja").read_text())
    assert over_network.apply_chat_template(MESSAGES) == ours


def test_a_list_of_named_templates_uses_the_default_one(tmp_path, model_dirs):
    d = copy_model(tmp_path, model_dirs)
    edit_json(d / "tokenizer_config.json", chat_template=[
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"}])
    assert Tokenizer(d).apply_chat_template(MESSAGES) == "Be brief."


@pytest.mark.parametrize("template,expected", [
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
     "TemplateError: Conversation roles must alternate"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{{ messages[5]['content'] }}", "UndefinedError"),
])
def test_whatever_a_template_raises_is_this_requests_input_error(tmp_path, model_dirs,
                                                                  template, expected):
    from gpu_runtime.errors import RuntimeInputError

    d = copy_model(tmp_path, model_dirs)
    edit_json(d / "tokenizer_config.json", chat_template=template)
    with pytest.raises(RuntimeInputError, match=expected) as info:
        Tokenizer(d).encode_chat(MESSAGES)
    assert info.value.param == "messages" and info.value.status == 400


def test_added_and_special_tokens_as_in_transformers(tmp_path, model_dirs):
    """Added tokens stay whole; skip_special_tokens drops the special ones only."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    d = copy_model(tmp_path, model_dirs)
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    ours, ref = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    text = "<|im_start|>user <think>serverless</think> hello"
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]
    start, think = tok.token_to_id("<|im_start|>"), tok.token_to_id("<think>")
    assert start in ids and think in ids
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip)
    assert "<|im_start|>" not in ours.decode(ids) and "<think>" in ours.decode(ids)


@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_follows_tokenizer_json_as_transformers_does(tmp_path, model_dirs, add_bos):
    """transformers 5 adds BOS where tokenizer.json's post-processor does, whatever
    tokenizer_config.json's add_bos_token says; so do we."""
    from transformers import AutoTokenizer

    d = copy_model(tmp_path, model_dirs)
    edit_json(d / "tokenizer_config.json", add_bos_token=add_bos)
    ids = Tokenizer(d).encode("hello world")
    assert ids == AutoTokenizer.from_pretrained(d)("hello world")["input_ids"]
    assert ids[0] == 1  # the demo tokenizer.json adds <s>


def test_generation_config_is_read_with_the_tokenizer(tmp_path, model_dirs):
    d = copy_model(tmp_path, model_dirs)
    edit_json(d / "generation_config.json", eos_token_id=[2, 7], temperature=0.6, top_p=0.9,
              do_sample=True)
    gen = Tokenizer(d).generation
    assert gen.eos_token_ids == (2, 7)
    assert gen.sampling_defaults() == {"temperature": 0.6, "top_p": 0.9}
