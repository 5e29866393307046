"""Checks an invocation's input against its model before it is queued, so that a request the
worker would refuse is answered 400 at once, also for streams, instead of after a cold start:
token ids inside the vocabulary, the prompt within the context (text and messages tokenised
here with the model's own tokenizer, the same one the worker uses), a chat template present
for messages."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from gpu_runtime.checkpoint import CheckpointError, Source
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.tokenizer import Tokenizer
from hydraserve.errors import InvalidRequest, ServiceUnavailable
from hydraserve.functions.service import Target
from hydraserve.invocations.schemas import InvokeRequest


class Tokenizers:
    """Each model's tokenizer, read once from the model store per API process (LRU)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[int, Tokenizer | None] = OrderedDict()
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


def load_tokenizer(uri: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
    source = Source(uri)
    try:
        if not source.exists("tokenizer.json"):
            return None
        config = (json.loads(source.read("tokenizer_config.json"))
                  if source.exists("tokenizer_config.json") else {})
        return Tokenizer.from_json(source.read("tokenizer.json").decode(), config)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"the model store did not give this model's tokenizer "
                                 f"({type(exc).__name__}); retry shortly") from None


def check_input(target: Target, body: InvokeRequest, tokenizers: Tokenizers) -> None:
    """Raises InvalidRequest for an input the worker would refuse."""
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
