"""Tokenizer from ``tokenizer.json`` (the ``tokenizers`` library), the chat template from
``chat_template.jinja`` (what current transformers writes) or ``tokenizer_config.json``, rendered
with jinja2 the way transformers does, and the checkpoint's ``generation_config.json`` (stop ids
and sampling defaults), which is read from the same place as the tokenizer.

BOS/EOS are added as ``tokenizer.json``'s post-processor says, as transformers 5 does: its
``add_bos_token`` in ``tokenizer_config.json`` does not override the post-processor.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.generation_config import GenerationDefaults

# the files of a checkpoint this class reads, tokenizer.json first (the others are optional)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        cfg_path, gen_path = model_dir / "tokenizer_config.json", model_dir / "generation_config.json"
        jinja = model_dir / "chat_template.jinja"
        self._setup(HFTokenizer.from_file(str(model_dir / "tokenizer.json")),
                    json.loads(cfg_path.read_text()) if cfg_path.is_file() else {},
                    jinja.read_text() if jinja.is_file() else None,
                    json.loads(gen_path.read_text()) if gen_path.is_file() else None)

    @classmethod
    def from_json(cls, tokenizer_json: str, config: dict, chat_template: str | None = None,
                  generation: dict | None = None) -> Tokenizer:
        """From the text of ``tokenizer.json``, the parsed ``tokenizer_config.json``, the text
        of ``chat_template.jinja`` and the parsed ``generation_config.json`` (a checkpoint read
        over the network, not from a directory)."""
        tok = cls.__new__(cls)
        tok._setup(HFTokenizer.from_str(tokenizer_json), config, chat_template, generation)
        return tok

    def _setup(self, tok: HFTokenizer, config: dict, chat_template: str | None,
               generation: dict | None) -> None:
        self._tok = tok
        self.config = config
        # chat_template.jinja wins over tokenizer_config.json, as in transformers
        self.chat_template: str | None = chat_template or _template(config.get("chat_template"))
        self.generation = GenerationDefaults.from_dict(generation)
        self._byte_level: bool | None = None  # the decoder is byte-level BPE (read when asked)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @classmethod
    def maybe(cls, model_dir: str | Path) -> Tokenizer | None:
        return cls(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (what ``gpu_runtime.structured`` reads the
        vocabulary from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, which may be part of a character (a byte-level BPE
        token, a SentencePiece ``<0xE2>`` byte-fallback token); a SentencePiece ``▁`` is a
        space."""
        from gpu_runtime.detokenize import piece_bytes

        if self._byte_level is None:
            self._byte_level = "ByteLevel" in json.dumps(
                json.loads(self._tok.to_str()).get("decoder"))
        return piece_bytes(self._tok.id_to_token(token_id) or "", self._byte_level)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the checkpoint's template (sandboxed jinja2)."""
        if not self.chat_template:
            raise RuntimeInputError("this model has no chat_template (neither "
                                    "chat_template.jinja nor tokenizer_config.json has one); "
                                    "send a plain prompt instead of messages", "messages")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if "developer" not in self.chat_template:  # OpenAI's newer name for system
            messages = [m | {"role": "system"} if m.get("role") == "developer" else m
                        for m in messages]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # the helpers transformers gives templates: HF templates refuse messages (a role out of
        # order) with raise_exception, and Llama 3.2's stamps the date with strftime_now
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        # a template is the checkpoint's code: whatever it raises on these messages (its own
        # raise_exception, a TypeError on a content it did not expect) fails this request alone
        except (TemplateError, TypeError, ValueError, KeyError, IndexError,
                AttributeError) as exc:
            raise RuntimeInputError(f"the model's chat template failed on these messages: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}", "messages") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template already places special tokens where the model expects them
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _template(value: object) -> str | None:
    """A template string; of a list of named templates (``[{"name", "template"}]``, as some
    checkpoints ship a tool-use one beside it), the one named ``default``."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _token_text(tok: object) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised as {"content": ...}
        return tok.get("content")
    return tok if isinstance(tok, str) else None
