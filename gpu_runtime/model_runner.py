"""Turns a scheduled step into tensors and runs it: on one stage holding the whole model, or on
stage 0 of a pipeline whose other stages live in other processes (``gpu_runtime.pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_runtime.attention import AttentionMetadata, Scratch
from gpu_runtime.backends.torch_backend import check_step_indices
from gpu_runtime.block_manager import BlockManager
from gpu_runtime.devices import to_device
from gpu_runtime.kv_cache import KVCache
from gpu_runtime.sampling import Sampled, SamplingBatch, sample
from gpu_runtime.sequence import Sequence
from gpu_runtime.stage import Stage
from gpu_runtime.structured import apply_token_bitmask


@dataclass(slots=True)
class StepBatch:
    """One step's inputs, the same for every stage (stage 0 also uses ``input_ids``).

    input_ids, positions, slot_mapping: (num_tokens,) int64
    block_tables: (batch, max_blocks) int64
    num_samples: tokens sampled from each sequence's last row (n choices of a new request take
        n samples of its prompt's last row); None: one each
    block_copies: copy-on-write (src, dst) blocks each stage copies before its forward
    token_bitmask: (sample rows, ceil(vocab / 32)) int32, bit set = token allowed
        (``gpu_runtime.structured``); None: no row is constrained
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_lens: list[int]
    sampling: SamplingBatch
    num_samples: list[int] | None = None
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    token_bitmask: torch.Tensor | None = None

    def metadata(self, block_size: int, device: torch.device,
                 scratch: Scratch | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            positions=to_device(self.positions, device),
            slot_mapping=to_device(self.slot_mapping, device),
            block_tables=to_device(self.block_tables, device), context_lens=self.context_lens,
            query_lens=self.query_lens, block_size=block_size, scratch=scratch,
            host_block_tables=self.block_tables)

    def logits_rows(self) -> list[int] | None:
        """Row of each sample's last token in the flat token dimension (a sequence's row
        repeated for each of its ``num_samples``); None when every row is a last token, once
        (decode)."""
        if max(self.query_lens) == 1 and self.num_samples is None:
            return None
        counts = self.num_samples or [1] * len(self.query_lens)
        rows, end = [], 0
        for n, count in zip(self.query_lens, counts, strict=True):
            end += n
            rows += [end - 1] * count
        return rows


def prepare_step(seqs: list[Sequence], is_prefill: bool, blocks: BlockManager) -> StepBatch:
    """Inputs of a step: whole token lists for prefill, the last token for decode."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    context_lens, query_lens = [], []
    for seq in seqs:
        start = 0 if is_prefill else seq.num_tokens - 1
        tokens = seq.token_ids[start:] if is_prefill else [seq.token_ids[-1]]
        input_ids += tokens
        positions += range(start, seq.num_tokens)
        slots += blocks.slots(seq.seq_id, start, seq.num_tokens)
        context_lens.append(seq.num_tokens)
        query_lens.append(seq.num_tokens - start)
    width = max(len(blocks.block_table(s.seq_id)) for s in seqs)
    tables = [blocks.block_table(s.seq_id) + [0] * (width - len(blocks.block_table(s.seq_id)))
              for s in seqs]
    return StepBatch(torch.tensor(input_ids), torch.tensor(positions), torch.tensor(slots),
                     torch.tensor(tables), context_lens, query_lens, sampling_of(seqs))


def sampling_of(seqs: list[Sequence]) -> SamplingBatch:
    """The sampler's settings, one row per sequence sampled from."""
    return SamplingBatch.of([s.params for s in seqs], [len(s.output_ids) for s in seqs],
                            [(s.prompt_ids, s.output_ids) for s in seqs])


def run_stage(stage: Stage, kv: KVCache, x: torch.Tensor, step: StepBatch) -> torch.Tensor:
    """Forward of one stage on one step; on the last stage returns logits of last tokens."""
    kv.copy_blocks(step.block_copies)  # before the forward: it may write the copies
    meta = step.metadata(kv.spec.block_size, stage.device, kv.scratch)
    if stage.device.type == "cuda":  # its indices checked here, on the host: no device sync
        check_step_indices(step.slot_mapping, step.block_tables, step.context_lens,
                           kv.spec.num_blocks, kv.spec.block_size)
        meta.checked_cache = (kv.spec.num_blocks, kv.spec.block_size)
    h = stage(to_device(x, stage.device), meta, kv)
    if not stage.spec.is_last:
        return h
    rows = step.logits_rows()
    if rows is not None:
        h = h.index_select(0, to_device(torch.tensor(rows), h.device))  # (samples, hidden)
    logits = stage.compute_logits(h)
    if step.token_bitmask is not None:
        apply_token_bitmask(logits, step.token_bitmask)
    return logits


def decode_graphs(stage: Stage, kv: KVCache):
    """CUDA graphs of the decode step where they can hold it: a CUDA device whose backend
    decodes with the Triton kernel (no host read, no shape from the contexts), a model without
    a sliding window, ``HYDRA_CUDA_GRAPHS`` not 0; else None (every step eager)."""
    from gpu_runtime import backends, cuda_graphs

    backend = backends.for_device(stage.device)
    if (stage.device.type != "cuda" or not cuda_graphs.enabled()
            or not getattr(backend, "paged_kernel", False)
            or stage.config.sliding_window is not None):
        return None
    return cuda_graphs.DecodeGraphs(stage, kv)


class LocalRunner:
    """The whole model in this process (``pp = 1``)."""

    def __init__(self, stage: Stage, kv: KVCache) -> None:
        assert stage.spec.is_first and stage.spec.is_last, f"{stage.spec} is not a whole model"
        self.stage, self.kv = stage, kv
        self.graphs = decode_graphs(stage, kv)

    @torch.inference_mode()
    def execute(self, step: StepBatch) -> Sampled:
        logits = self._graph_logits(step) if self.graphs is not None else None
        if logits is None:
            logits = run_stage(self.stage, self.kv, step.input_ids, step)
        return sample(logits, step.sampling)

    def _graph_logits(self, step: StepBatch) -> torch.Tensor | None:
        """A decode step through a CUDA graph (``cuda_graphs``), or None: run it eagerly."""
        assert self.graphs is not None
        if not self.graphs.applies(step):
            return None
        check_step_indices(step.slot_mapping, step.block_tables, step.context_lens,
                           self.kv.spec.num_blocks, self.kv.spec.block_size)
        logits = self.graphs.logits(step)
        if logits is not None and step.token_bitmask is not None:
            logits = logits.clone()  # the graph's output is overwritten by the next replay
            apply_token_bitmask(logits, step.token_bitmask)
        return logits

    def close(self) -> None:
        pass
