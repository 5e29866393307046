"""Continuous batching: which sequences run in the next step, within the KV block budget.

A step is either a prefill step (new or preempted sequences, whole prompts) or a decode step
(one token for every running sequence). Waiting sequences are admitted first-come first-served
when their blocks fit; when a running sequence cannot grow, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its prompt plus its output.

A request with ``n`` choices is admitted as one sequence with ``n - 1`` pending forks, counted
against ``max_num_seqs`` as ``n``; once its prompt is prefilled the engine calls ``fork`` and
the choices share the prompt's blocks (``BlockManager.fork``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gpu_runtime.block_manager import BlockManager
from gpu_runtime.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} and max_num_batched_tokens="
                             f"{self.max_num_batched_tokens} must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences of the next step, is_prefill); empty when nothing can run."""
        prefill = self._schedule_prefill()
        if prefill:
            return prefill, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        num_tokens = 0
        num_seqs = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            if num_seqs + 1 + len(seq.forks) > self.config.max_num_seqs:
                break
            over = num_tokens + seq.num_tokens > self.config.max_num_batched_tokens
            if (over and scheduled) or not self.blocks.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.seq_id, seq.num_tokens)
            seq.status, seq.num_cached = SequenceStatus.RUNNING, 0
            scheduled.append(seq)
            num_tokens += seq.num_tokens
            num_seqs += 1 + len(seq.forks)
        self.running.extend(scheduled)
        return scheduled

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Starts the parent's pending forks, right after its prompt was prefilled: each shares
        the parent's blocks and cached tokens and runs from now on."""
        forks, parent.forks = parent.forks, []
        for child in forks:
            self.blocks.fork(parent.seq_id, child.seq_id)
            child.status, child.num_cached = SequenceStatus.RUNNING, parent.num_cached
        self.running.extend(forks)
        return forks

    def _schedule_decode(self) -> list[Sequence]:
        queue = list(self.running)
        scheduled: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq.seq_id, seq.num_tokens):
                victim = queue.pop() if queue else seq  # the newest sequence gives way
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.seq_id, seq.num_tokens)
                scheduled.append(seq)
        self.running = list(scheduled)  # the caller iterates ``scheduled`` while finishing
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.status, seq.num_cached = SequenceStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Marks ``seq`` finished and returns its blocks; works for waiting ones too (abort),
        whose pending forks finish with it."""
        for child in seq.forks:
            child.status, child.finish_reason = SequenceStatus.FINISHED, reason
        seq.forks = []
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.blocks.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
