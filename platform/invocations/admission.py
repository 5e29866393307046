"""Checks an invocation's input against its model before it is queued, so that a request the
worker would refuse is answered 400 at once, also for streams, instead of after a cold start:
token ids inside the vocabulary, the prompt within the context (text and messages tokenised
here with the model's own tokenizer, the same one the worker uses), a chat template present
for messages."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping

from gpu_runtime.checkpoint import CheckpointError, Source
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.structured import Grammars, StructuredOutputError
from gpu_runtime.tokenizer import Tokenizer
from hydraserve.errors import InvalidRequest, ServiceUnavailable
from hydraserve.functions.service import Target
from hydraserve.invocations.schemas import InvokeRequest

SAMPLING_DEFAULTS = {"temperature", "top_p", "top_k"}  # what generation_config.json may set


class Tokenizers:
    """Each model's tokenizer, read once from the model store per API process (LRU)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[int, Tokenizer | None] = OrderedDict()
        self._grammars: OrderedDict[int, Grammars] = OrderedDict()  # response_format checks
        self._lock = threading.Lock()

    def get(self, target: Target) -> Tokenizer | None:
        with self._lock:
            if target.model_id in self._cache:
                self._cache.move_to_end(target.model_id)
                return self._cache[target.model_id]
        tok = load_tokenizer(target.model_uri)
        with self._lock:
            self._cache[target.model_id] = tok
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return tok

    def grammars(self, target: Target) -> Grammars | None:
        """The model's grammar compiler, or None without a tokenizer. EOS does not change
        whether a schema compiles; the tokenizer's own EOS stands in for config.json's."""
        with self._lock:
            if target.model_id in self._grammars:
                self._grammars.move_to_end(target.model_id)
                return self._grammars[target.model_id]
        tok = self.get(target)
        if tok is None:
            return None
        eos = tok.eos_token_id
        grammars = Grammars(tok.to_json(), target.vocab_size, (eos if eos is not None else 0,))
        with self._lock:
            self._grammars[target.model_id] = grammars
            while len(self._grammars) > self.capacity:
                self._grammars.popitem(last=False)
        return grammars


def load_tokenizer(uri: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
    source = Source(uri)
    try:
        if not source.exists("tokenizer.json"):
            return None
        config = (json.loads(source.read("tokenizer_config.json"))
                  if source.exists("tokenizer_config.json") else {})
        template = (source.read("chat_template.jinja").decode()
                    if source.exists("chat_template.jinja") else None)
        generation = (json.loads(source.read("generation_config.json"))
                      if source.exists("generation_config.json") else None)
        return Tokenizer.from_json(source.read("tokenizer.json").decode(), config, template,
                                   generation)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"the model store did not give this model's tokenizer "
                                 f"({type(exc).__name__}); retry shortly") from None


def with_model_defaults(target: Target, body: InvokeRequest, tokenizers: Tokenizers,
                        fallback: Mapping[str, object] | None = None) -> InvokeRequest:
    """``body`` with the model's sampling defaults (its ``generation_config.json``:
    temperature, top_p, top_k) in the fields the request did not set. Applied here, before the
    request is stored, so that the stored request is what the worker runs and a sampled one
    gets its seed (``service.accept``). ``fallback`` fills what is still unset after them (the
    OpenAI-compatible endpoints pass OpenAI's documented defaults)."""
    if body.model_fields_set >= SAMPLING_DEFAULTS:
        return body
    tok = tokenizers.get(target)  # read once per model with its tokenizer (cached)
    defaults = dict(fallback or {}) | (tok.generation.sampling_defaults() if tok is not None
                                       else {})
    unset = {k: v for k, v in defaults.items() if k not in body.model_fields_set}
    return body.model_copy(update=unset) if unset else body


def check_response_format(target: Target, body: InvokeRequest, tokenizers: Tokenizers) -> None:
    """A JSON schema the worker could not compile is a 400 now: it is compiled here, against
    the model's own vocabulary, as the worker will (each schema once per API process)."""
    if body.response_format is None or body.response_format.type == "text":
        return
    try:
        grammars = tokenizers.grammars(target)
        if grammars is None:
            raise InvalidRequest("response_format needs the model's tokenizer.json, which this "
                                 "model does not have", "response_format")
        grammars.check(body.response_format.model_dump(exclude_none=True))
    except StructuredOutputError as exc:
        raise InvalidRequest(exc.message, "response_format") from None


def check_logit_bias(target: Target, body: InvokeRequest) -> None:
    """Every biased token id inside the model's vocabulary."""
    bad = [k for k in body.logit_bias or {} if int(k) >= target.vocab_size]
    if bad:
        raise InvalidRequest(f"logit_bias token id {bad[0]} is outside the vocabulary; allowed "
                             f"0..{target.vocab_size - 1}", "logit_bias")


def check_input(target: Target, body: InvokeRequest, tokenizers: Tokenizers) -> None:
    """Raises InvalidRequest for an input the worker would refuse."""
    check_logit_bias(target, body)
    check_response_format(target, body, tokenizers)
    if body.prompt_ids is not None:
        ids, param = body.prompt_ids, "prompt_ids"
    else:
        tok = tokenizers.get(target)
        if tok is None:
            raise InvalidRequest("this model has no tokenizer.json; send prompt_ids",
                                 "messages" if body.messages is not None else "prompt")
        try:
            if body.messages is not None:
                ids, param = tok.encode_chat([m.model_dump() for m in body.messages]), "messages"
            else:
                assert body.prompt is not None, "InvokeRequest holds one input"
                ids, param = tok.encode(body.prompt), "prompt"
        except RuntimeInputError as exc:
            raise InvalidRequest(exc.message, exc.param) from None
    bad = [t for t in ids if not 0 <= t < target.vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary; allowed "
                             f"0..{target.vocab_size - 1}", param)
    if not ids:
        raise InvalidRequest("the prompt is empty once tokenised; send some text", param)
    if len(ids) >= target.context:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; allowed at most "
                             f"{target.context - 1} (context {target.context} tokens, one left "
                             "for the first output token)", param)
