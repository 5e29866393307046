"""What a worker needs to find a cached buffer: a small, serialisable handle."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True, slots=True)
class BufferHandle:
    """Names one (model, stage) buffer in a node's pool: file, extent, generation, layout."""

    key: str
    model: str
    stage: str
    pool_path: str
    extent_offset: int
    extent_bytes: int
    generation: int
    size: int
    layout_digest: str

    def __post_init__(self) -> None:
        if self.extent_offset % 4096 or self.extent_bytes <= 0:
            raise ValueError(f"extent must be page-aligned and non-empty, got offset "
                             f"{self.extent_offset} bytes {self.extent_bytes}")

    def to_dict(self) -> dict:
        """A JSON-able form, for a task payload."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BufferHandle:
        return cls(**data)
