"""Tokenizer from ``tokenizer.json`` (the ``tokenizers`` library) and the chat template from
``tokenizer_config.json``, rendered with jinja2 the way transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from gpu_runtime.errors import RuntimeInputError


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        cfg_path = model_dir / "tokenizer_config.json"
        self._setup(HFTokenizer.from_file(str(model_dir / "tokenizer.json")),
                    json.loads(cfg_path.read_text()) if cfg_path.is_file() else {})

    @classmethod
    def from_json(cls, tokenizer_json: str, config: dict) -> Tokenizer:
        """From the text of ``tokenizer.json`` and the parsed ``tokenizer_config.json`` (a
        checkpoint read over the network, not from a directory)."""
        tok = cls.__new__(cls)
        tok._setup(HFTokenizer.from_str(tokenizer_json), config)
        return tok

    def _setup(self, tok: HFTokenizer, config: dict) -> None:
        self._tok = tok
        self.config = config
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @classmethod
    def maybe(cls, model_dir: str | Path) -> Tokenizer | None:
        return cls(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the checkpoint's template (sandboxed jinja2)."""
        if not self.chat_template:
            raise RuntimeInputError("this model has no chat_template in tokenizer_config.json; "
                                    "send a plain prompt instead of messages", "messages")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:  # the checkpoint's template refused these messages
            raise RuntimeInputError(f"the model's chat template failed on these messages: "
                                    f"{type(exc).__name__}: {str(exc)[:200]}", "messages") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template already places special tokens where the model expects them
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(tok: object) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised as {"content": ...}
        return tok.get("content")
    return tok if isinstance(tok, str) else None
