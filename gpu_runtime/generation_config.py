"""What a checkpoint's ``generation_config.json`` says about serving it: the extra stop ids
(Llama 3 Instruct stops on ``<|eot_id|>`` as well as ``<|end_of_text|>``, and only this file
lists both) and the sampling settings its authors ship as defaults (temperature, top_p, top_k).

The stop ids are merged into the engine's (``LLMEngine.eos_token_ids``). The sampling defaults
are applied by the API to the fields a request leaves unset (``invocations.admission``), so a
request that names its own settings always gets them. See docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# the ranges the API accepts (invocations.schemas.Sampling); a value outside is not a default
RANGES = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (0, 1000)}


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    sampling: tuple[tuple[str, float | int], ...] = ()  # (field, value) the request may override

    @classmethod
    def from_dict(cls, raw: dict | None) -> GenerationDefaults:
        """From a parsed ``generation_config.json``. ``do_sample: false`` means the authors
        ship greedy decoding, so its temperature/top_p/top_k are not defaults (as in HF)."""
        raw = raw or {}
        eos = raw.get("eos_token_id")
        ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
        if raw.get("do_sample") is False:
            return cls(ids)
        sampling = []
        for name, (low, high) in RANGES.items():
            value = raw.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and low <= value <= high:
                sampling.append((name, int(value) if name == "top_k" else float(value)))
        return cls(ids, tuple(sampling))

    def sampling_defaults(self) -> dict[str, float | int]:
        return dict(self.sampling)
