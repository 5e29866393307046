"""``n`` choices per request: one prefill, shared prompt blocks with copy-on-write, per-choice
seeds that reproduce the choice alone, blocks given back on finish and abort, and the same
tokens through a two-stage pipeline."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.block_manager import BlockManager
from gpu_runtime.engine import EngineConfig, LLMEngine, choice_seed
from gpu_runtime.errors import RuntimeInputError
from gpu_runtime.sampling import SamplingParams
from tests.gpu_runtime.conftest import PROMPTS

PROMPT = PROMPTS[0]  # 11 tokens: with blocks of 4 the last prompt block is partly filled
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)


def engine_for(model_dir, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **kw))


def run(engine: LLMEngine) -> dict[tuple[str, int], list[int]]:
    """Every output token, by (request id, choice)."""
    tokens: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
    return tokens


def test_choices_share_one_prefill_and_match_their_seed_alone(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        engine.add_request("r", PROMPT, SAMPLED, n=3)
        first = engine.step()  # the prefill: one row, sampled three times
        assert [(o.request_id, o.index) for o in first] == [("r", 0), ("r", 1), ("r", 2)]
        assert engine.num_prefill_tokens == len(PROMPT)
        tables = [engine.blocks.block_table(s.seq_id) for s in engine.scheduler.running]
        assert tables[0] == tables[1] == tables[2], tables  # shared until someone writes
        assert [engine.blocks.ref_count(b) for b in tables[0]] == [3, 3, 3]
        second = engine.step()  # first decode: two of three copy the partial prompt block
        tables = [engine.blocks.block_table(s.seq_id) for s in engine.scheduler.running]
        assert len({t[2] for t in tables}) == 3 and len({t[0] for t in tables}) == 1, tables
        rest = run(engine)
        assert engine.num_prefill_tokens == len(PROMPT), "the prompt was prefilled again"
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "blocks leaked"
        for i in range(3):
            seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=choice_seed(1234, i),
                                    ignore_eos=True)
            engine.add_request(f"alone{i}", PROMPT, seeded)
        alone = run(engine)
    got = [first[i].new_token_ids + second[i].new_token_ids + rest[("r", i)] for i in range(3)]
    assert got == [alone[(f"alone{i}", 0)] for i in range(3)]
    assert len({tuple(t) for t in got}) == 3, "three seeds drew the same tokens"


def test_request_finishes_when_its_last_choice_does(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        engine.add_request("r", PROMPT, SAMPLED, n=2)
        finished = []
        while engine.has_unfinished():
            finished += [(o.index, o.request_finished) for o in engine.step() if o.finished]
    assert sorted(finished) == [(0, False), (1, True)] or sorted(finished) == [(0, True),
                                                                                (1, False)]


def test_greedy_choices_are_equal(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        engine.add_request("g", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True), n=4)
        tokens = run(engine)
    assert len(tokens) == 4 and len({tuple(t) for t in tokens.values()}) == 1, tokens


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_abort_frees_every_choice(model_dirs, steps):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        engine.add_request("r", PROMPT, SAMPLED, n=3)
        for _ in range(steps):
            engine.step()
        assert engine.abort("r") is True
        assert not engine.has_unfinished()
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        assert engine.abort("r") is False


def test_preempted_choices_give_the_same_tokens(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as roomy:
        roomy.add_request("r", PROMPT, SAMPLED, n=3)
        expected = run(roomy)
    # 3 choices of 11 + 12 tokens need up to 3 * 6 blocks of 4 (shared prompt blocks fewer)
    with engine_for(model_dirs["llama-gqa"], num_kv_blocks=10) as tight:
        tight.add_request("r", PROMPT, SAMPLED, n=3)
        got = run(tight)
        assert tight.scheduler.num_preemptions > 0, "budget too large to force preemption"
        assert tight.blocks.num_free_blocks == 10
    assert got == expected


def test_n_out_of_range_is_refused(model_dirs):
    with engine_for(model_dirs["llama-gqa"]) as engine:
        for n in (0, 9):
            with pytest.raises(RuntimeInputError, match=rf"n={n}.*1\.\.8") as err:
                engine.add_request("r", PROMPT, SAMPLED, n=n)
            assert err.value.param == "n"
        assert not engine.has_unfinished()


def test_pipeline_choices_match_one_stage(model_dirs):
    """pp = 2: the forked block tables and the copy-on-write copies are mirrored on stage 1."""
    with engine_for(model_dirs["llama-gqa"]) as local:
        local.add_request("r", PROMPT, SAMPLED, n=3)
        local.add_request("g", PROMPTS[2], SamplingParams(max_tokens=6, ignore_eos=True), n=2)
        expected = run(local)
    with engine_for(model_dirs["llama-gqa"], pp=2, num_threads=1) as pipe:
        pipe.add_request("r", PROMPT, SAMPLED, n=3)
        pipe.add_request("g", PROMPTS[2], SamplingParams(max_tokens=6, ignore_eos=True), n=2)
        got = run(pipe)
        assert pipe.num_prefill_tokens == len(PROMPT) + len(PROMPTS[2])
    assert got == expected


# ---- the block manager's shared blocks ---------------------------------------------------------

def test_fork_shares_and_copy_on_write_copies_the_written_block():
    bm = BlockManager(8, 4)
    bm.allocate(0, 6)  # blocks 0, 1 (block 1 holds 2 of 4)
    bm.fork(0, 1)
    assert bm.num_free_blocks == 6 and bm.block_table(1) == [0, 1]
    assert bm.can_append(1, 7)
    bm.append(1, 7)  # position 6 is in shared block 1: a private copy first
    assert bm.block_table(1) == [0, 2] and bm.take_copies() == [(1, 2)]
    bm.append(0, 7)  # the parent now holds block 1 alone: written in place
    assert bm.block_table(0) == [0, 1] and bm.take_copies() == []
    bm.free(0)
    assert bm.num_free_blocks == 6  # block 0 is still held by the child
    bm.free(1)
    assert bm.num_free_blocks == 8


def test_full_prompt_blocks_need_no_copy():
    bm = BlockManager(8, 4)
    bm.allocate(0, 8)
    bm.fork(0, 1)
    bm.append(1, 9)  # position 8 opens a new block of its own
    assert bm.take_copies() == [] and bm.block_table(1) == [0, 1, 2]


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "fork", "append", "free"]),
                         st.integers(0, 5), st.integers(0, 5), st.integers(1, 9)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]), ops=OPS)
def test_random_fork_programs_keep_counts_exact(num_blocks, block_size, ops):
    """Reference counts equal the tables holding each block, free blocks are the unheld ones,
    and a written position never lies in a block another table holds."""
    bm = BlockManager(num_blocks, block_size)
    lengths: dict[int, int] = {}
    for op, seq, other, n in ops:
        if op == "alloc" and not bm.has(seq) and bm.can_allocate(n):
            bm.allocate(seq, n)
            lengths[seq] = n
        elif op == "fork" and bm.has(seq) and not bm.has(other):
            bm.fork(seq, other)
            lengths[other] = lengths[seq]
        elif op == "append" and bm.has(seq) and bm.can_append(seq, lengths[seq] + n):
            lengths[seq] += n
            bm.append(seq, lengths[seq])
            written = bm.block_table(seq)[(lengths[seq] - 1) // block_size]
            assert bm.ref_count(written) == 1, f"seq {seq} writes shared block {written}"
        elif op == "free":
            bm.free(seq)
            lengths.pop(seq, None)
        held = [b for s in lengths for b in bm.block_table(s)]
        for b in set(held):
            assert bm.ref_count(b) == held.count(b), (b, bm.ref_count(b), held.count(b))
        assert len(set(held)) + bm.num_free_blocks == num_blocks, (held, bm.num_free_blocks)
