"""A ``tokenizers`` tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata.

llama.cpp keeps the vocabulary, the merges and each token's type in the file, and names the
text split ("pre-tokenizer") its merges were learned with in ``tokenizer.ggml.pre``. We rebuild
the Hugging Face tokenizer from those: byte-level BPE (GGUF model ``gpt2``, what SmolLM2, Llama 3
and most BPE models use) with the split llama.cpp applies for that ``pre``, control tokens as
special added tokens (so ``<|im_start|>`` stays one token and ``skip_special_tokens`` drops
it), user-defined ones as plain added tokens, and BOS/EOS added per the file's flags.
SentencePiece (GGUF model ``llama``) is not yet supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from gpu_runtime.errors import UnsupportedModelError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 is a normal token)
# Llama 3's split (llama.cpp's "llama-bpe"): letters, numbers of up to 3 digits, punctuation
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PRES = ("default", "gpt2")  # GPT-2's own split, ByteLevel's built-in regex
DIGIT_PRES = ("smollm",)  # each digit alone, then GPT-2's split (SmolLM's tokenizer.json too)
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
PRE_TOKENIZERS = (*GPT2_PRES, *DIGIT_PRES, *LLAMA3_PRES)


@dataclass(frozen=True, slots=True)
class GGUFVocab:
    """The tokenizer metadata of a GGUF file, as plain values."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None  # end of turn (Llama 3's <|eot_id|>): also a stop token
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    add_space_prefix: bool = False

    def token(self, token_id: int | None) -> str | None:
        return self.tokens[token_id] if token_id is not None and token_id < len(self.tokens) \
            else None


def build_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """The byte-level BPE tokenizer ``vocab`` describes; raises UnsupportedModelError for a
    tokenizer model or split we do not rebuild."""
    if vocab.model != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {vocab.model!r} is not supported yet; supported: 'gpt2' "
            "(byte-level BPE). SentencePiece ('llama') GGUFs need their original tokenizer.json",
            "tokenizer.ggml.model")
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    merges = [_merge(m) for m in vocab.merges]
    tok = HFTokenizer(models.BPE(ids, merges, fuse_unk=False, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(vocab.pre, vocab.add_space_prefix)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(vocab)
    _add_tokens(tok, vocab)
    return tok


def _merge(text: str) -> tuple[str, str]:
    left, sep, right = text.partition(" ")
    if not sep:
        raise UnsupportedModelError(f"GGUF merge {text[:40]!r} is not two tokens separated by "
                                    "a space", "tokenizer.ggml.merges")
    return left, right


def _pre_tokenizer(pre: str, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in GPT2_PRES:
        return byte_level
    if pre in DIGIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if pre in LLAMA3_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedModelError(
        f"GGUF pre-tokenizer {pre!r} is not supported yet; supported: {PRE_TOKENIZERS}",
        "tokenizer.ggml.pre")


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor:
    """ByteLevel offsets, then BOS/EOS where the file says llama.cpp adds them."""
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    bos = vocab.token(vocab.bos_token_id) if vocab.add_bos_token else None
    eos = vocab.token(vocab.eos_token_id) if vocab.add_eos_token else None
    if bos or eos:
        b, e = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
        specials = [(t, vocab.tokens.index(t)) for t in dict.fromkeys((bos, eos)) if t]
        steps.append(processors.TemplateProcessing(
            single=f"{b}$A:0{e}", pair=f"{b}$A:0{e} {b.replace(':0', ':1')}$B:1{e}",
            special_tokens=specials))
    return processors.Sequence(steps)


def _add_tokens(tok: HFTokenizer, vocab: GGUFVocab) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens,
    each matched whole in the text (they keep their ids: they are in the vocabulary)."""
    control = [t for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
               if kind == CONTROL]
    user = [t for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
            if kind == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def tokenizer_config(vocab: GGUFVocab, chat_template: str | None, context: int) -> dict:
    """``tokenizer_config.json`` for the rebuilt tokenizer."""
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
        "add_bos_token": vocab.add_bos_token, "add_eos_token": vocab.add_eos_token,
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unk", "pad"):
        text = vocab.token(getattr(vocab, f"{name}_token_id"))
        if text is not None:
            config[f"{name}_token"] = text
    if chat_template:
        config["chat_template"] = chat_template
    return config
