"""What a worker's device memory share holds: the weights of its stage, a workspace for the
activations of the largest batch, and the KV cache in what is left (never the whole share).

    budget = MemoryBudget.of(share, stage_weights, workspace_bytes(config, ...))
    budget.check(block_bytes)      # ShareTooSmallError: not the weights and one block of KV
    kv_bytes = budget.kv_bytes

The same accounting runs everywhere: the planner refuses a share too small for the weights,
the workspace and one block (so a bad plan fails when it is made, not at load), the node sizes
the KV cache from it, and the worker reports it. The workspace is an upper bound of one
forward pass's live activations at ``max_tokens`` batched tokens (``max_seqs`` sequences
sampled): layers run one after another, so it is one layer's transients plus the residual
stream, plus the float32 logits on the last stage. On CUDA a worker also measures it (the
caching allocator's peak over a warm-up forward at the largest batch, as vLLM profiles) and
reports both numbers; CPUs have no allocator statistics to measure with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpu_runtime.config import ModelConfig
from gpu_runtime.errors import DataPlaneError

# the engine's default batch limits (scheduler.SchedulerConfig): what one step may hold
MAX_TOKENS = 4096
MAX_SEQS = 64


class ShareTooSmallError(DataPlaneError):
    """A memory share that cannot hold its weights, the workspace and one block of KV."""


def workspace_bytes(config: ModelConfig, elem_bytes: int, *, last: bool = True,
                    max_tokens: int = MAX_TOKENS, max_seqs: int = MAX_SEQS) -> int:
    """Peak live activations of one forward pass of ``max_tokens`` tokens through a stage of
    ``config``'s layers, in bytes; ``last``: the stage computes logits (float32, one row per
    sampled sequence, and as many again for sampling's softmax)."""
    t, h = max_tokens, config.hidden_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    attention = qkv + config.num_heads * config.head_dim  # q/k/v, then the attention output
    mlp = 3 * config.intermediate_size  # gate, up and their product
    per_token = 3 * h + max(attention, mlp)  # residual, normed input and a layer's output
    rope = 2 * t * config.head_dim * elem_bytes  # cos and sin of every position
    logits = 2 * max_seqs * config.vocab_size * 4 if last else 0
    return t * per_token * elem_bytes + rope + logits


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    share: int  # the device memory the plan gives the worker
    weights: int  # of its stage
    workspace: int  # activations of the largest batch

    @property
    def kv_bytes(self) -> int:
        """What the KV cache may take: the rest of the share (negative: it does not fit)."""
        return self.share - self.weights - self.workspace

    def check(self, block_bytes: int, where: str = "share") -> MemoryBudget:
        """Raises ``ShareTooSmallError`` unless the share holds one block of KV besides the
        weights and the workspace."""
        need = self.min_share(block_bytes)
        if self.share < need:
            raise ShareTooSmallError(
                f"a memory share of {self.share} bytes cannot hold {self.weights} bytes of "
                f"weights, a {self.workspace}-byte workspace and one {block_bytes}-byte KV "
                f"block; allowed: >= {need}", where)
        return self

    def min_share(self, block_bytes: int) -> int:
        return self.weights + self.workspace + block_bytes

    def to_dict(self) -> dict:
        return {"share": self.share, "weights": self.weights, "workspace": self.workspace,
                "kv": self.kv_bytes}


def measure_peak(run: Callable[[], object], device) -> int | None:
    """Bytes the CUDA caching allocator's peak rose by while ``run()`` ran (the workspace of a
    warm-up forward); None on a device without allocator statistics (CPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def profile_forward(stage, kv, max_tokens: int = MAX_TOKENS, max_seqs: int = MAX_SEQS) -> int:
    """One prefill of the largest batch the stage will see, or as much of it as ``kv`` holds
    (sequences as long as the model allows, each on blocks of its own), logits included on
    the last stage: what ``measure_peak`` watches. Returns the tokens it ran. Writes only
    blocks of ``kv`` (run it before the cache serves)."""
    import math

    import torch

    from gpu_runtime.attention import AttentionMetadata

    c, bs, device = stage.config, kv.spec.block_size, stage.device
    length = min(c.max_position_embeddings, max_tokens, kv.spec.num_blocks * bs)
    per_seq = math.ceil(length / bs)  # blocks of one sequence
    n = max(1, min(max_tokens // length, max_seqs, kv.spec.num_blocks // per_seq))
    blocks = torch.arange(n * per_seq, device=device).view(n, per_seq)
    offsets = torch.arange(length, device=device)
    slots = (blocks[:, offsets // bs] * bs + offsets % bs).reshape(-1)
    meta = AttentionMetadata(positions=offsets.repeat(n), slot_mapping=slots,
                             block_tables=blocks, context_lens=[length] * n,
                             query_lens=[length] * n, block_size=bs, scratch=kv.scratch)
    x = (torch.zeros(n * length, dtype=torch.long, device=device) if stage.spec.is_first else
         torch.zeros(n * length, c.hidden_size, dtype=stage.dtype, device=device))
    with torch.inference_mode():
        h = stage(x, meta, kv)
        if stage.spec.is_last:
            stage.compute_logits(h[length - 1::length])
    return n * length


def stage_report(stage, kv, share: int, weights: int) -> dict:
    """What a loaded stage's share holds, for the worker's ready report: the share, the
    weights, the workspace bound and the KV cache allocated; on CUDA also the workspace
    measured over ``profile_forward`` (None elsewhere)."""
    workspace = workspace_bytes(stage.config, stage.dtype.itemsize, last=stage.spec.is_last)
    measured = measure_peak(lambda: profile_forward(stage, kv), stage.device)
    return {"share": share, "weights": weights, "workspace": workspace,
            "workspace_measured": measured,
            "kv": kv.spec.bytes_per_block * kv.spec.num_blocks}
