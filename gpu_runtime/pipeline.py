"""Pipeline parallelism across processes: stage workers and stage 0's runner.

Stage 0 owns the batch, the sequences and the block tables; it runs its layers, then sends the
hidden states plus the step's attention inputs to stage 1. Every other stage runs its layers on
what it receives (writing its own KV cache at the same slots) and passes on; the last stage
samples and sends token ids and logprobs back to stage 0. Workers are spawned (never forked) on
this machine (as ``python -m gpu_runtime.pipeline`` child processes: a fresh interpreter, never a
fork, and no re-import of the parent's main module), or started the same way on other hosts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# Stages on one machine share cores and take turns. OpenMP threads that busy-wait after their
# last parallel region (libgomp spins 300k iterations, milliseconds, by default) steal those
# cores from the next stage's turn; a short spin keeps back-to-back kernels fast and hands the
# cores over within about a millisecond. Must be in the environment before torch loads:
# children get it here, a stage-0 process from ``prefer_short_spin`` (or its launcher).
STAGE_ENV = {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}

if __name__ == "__main__":  # a stage process started by hand or by an agent
    for _key, _value in STAGE_ENV.items():
        os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from gpu_runtime.channel import Channel, ChannelError, Message, to_device  # noqa: E402
from gpu_runtime.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from gpu_runtime.model_runner import StepBatch, run_stage  # noqa: E402
from gpu_runtime.sampling import Sampled, SamplingBatch, sample  # noqa: E402
from gpu_runtime.stage import Stage  # noqa: E402

READY_TIMEOUT_S = 600.0


def prefer_short_spin() -> None:
    """Sets STAGE_ENV in this process's environment (keeping values already set); effective
    only when called before torch is first imported."""
    for key, value in STAGE_ENV.items():
        os.environ.setdefault(key, value)
STEP_POLL_MS = 200
PARENT_CHECK_MS = 1000


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What stage 0 tells every stage so all KV caches share one block numbering."""

    num_blocks: int
    block_size: int


def ipc_addresses(pp: int) -> list[str]:
    base = Path(tempfile.gettempdir()) / f"hydra-pp-{uuid.uuid4().hex[:12]}"
    return [f"ipc://{base}-{i}" for i in range(pp)]


def step_message(step: StepBatch, hidden: torch.Tensor) -> Message:
    s = step.sampling
    meta = {"context_lens": step.context_lens, "query_lens": step.query_lens,
            "sampling": s.to_meta(),
            "num_samples": step.num_samples, "block_copies": step.block_copies}
    tensors = {"hidden": hidden, "positions": step.positions, "slot_mapping": step.slot_mapping,
               "block_tables": step.block_tables}
    if step.token_bitmask is not None:
        tensors["token_bitmask"] = step.token_bitmask
    return Message("step", meta, tensors)


def step_from_message(msg: Message) -> tuple[StepBatch, torch.Tensor]:
    t, m = msg.tensors, msg.meta
    step = StepBatch(torch.empty(0, dtype=torch.long), t["positions"], t["slot_mapping"],
                     t["block_tables"], m["context_lens"], m["query_lens"],
                     SamplingBatch.from_meta(m["sampling"]), m.get("num_samples"),
                     [(src, dst) for src, dst in m.get("block_copies", [])],
                     t.get("token_bitmask"))
    return step, t["hidden"]


class StageWorker:
    """A non-first stage: receive, run layers, pass on (or sample, on the last stage)."""

    def __init__(self, stage: Stage, channel: Channel) -> None:
        self.stage, self.channel = stage, channel
        self.kv: KVCache | None = None
        self.compute_s = 0.0
        self.num_steps = 0
        self.stopped_with: dict = {}  # the meta of the ``stop`` that ended the ring

    def serve(self, parent_pid: int | None = None) -> None:
        """Handles messages until ``stop``; with ``parent_pid``, also returns once that process
        (the stage 0 that started this one) is gone, so no stage outlives its pipeline."""
        while True:
            msg = self.channel.recv(PARENT_CHECK_MS if parent_pid else None)
            if msg is None:
                if os.getppid() != parent_pid:
                    return
                continue
            if msg.kind == "step":
                self._step(msg)
            elif msg.kind == "init":
                self._init(msg)
            elif msg.kind == "kv_pull":
                self._kv_pull(msg)
            elif msg.kind == "stats":
                msg.meta.setdefault("stages", []).append(
                    {"stage": self.stage.spec.index, "compute_s": self.compute_s,
                     "steps": self.num_steps})
                self.channel.send(msg)
            elif msg.kind == "stop":
                self.stopped_with = msg.meta
                self.channel.send(msg)
                return
            else:
                raise ChannelError(f"stage {self.stage.spec.index}: unknown message {msg.kind!r}")

    def _init(self, msg: Message) -> None:
        c, spec = self.stage.config, self.stage.spec
        self.kv = KVCache(KVCacheSpec(spec.layer_start, len(spec.layers), msg.meta["num_blocks"],
                                      msg.meta["block_size"], c.num_kv_heads, c.head_dim,
                                      self.stage.dtype), self.stage.device)
        msg.meta.setdefault("ready", []).append(spec.index)
        self.channel.send(msg)

    def _kv_pull(self, msg: Message) -> None:
        """Adds this stage's keys and values of ``meta["blocks"]`` (every layer it holds) to
        the message and passes it on; stage 0 gets it back with every stage's (consolidation's
        KV migration, ``gpu_runtime.consolidate``)."""
        assert self.kv is not None, f"stage {self.stage.spec.index} got kv_pull before init"
        blocks = torch.tensor(msg.meta["blocks"], dtype=torch.long, device=self.kv.data.device)
        msg.tensors[f"kv{self.stage.spec.index}"] = self.kv.data.index_select(2, blocks)
        self.channel.send(msg)

    @torch.inference_mode()
    def _step(self, msg: Message) -> None:
        assert self.kv is not None, f"stage {self.stage.spec.index} got a step before init"
        start = time.perf_counter()
        step, hidden = step_from_message(msg)
        hidden = to_device(hidden, self.stage.device).to(self.stage.dtype)
        out = run_stage(self.stage, self.kv, hidden, step)
        if self.stage.spec.is_last:
            sampled = sample(out, step.sampling)
            reply = Message("tokens", sampled._asdict())
        else:
            reply = step_message(step, out)
        self.compute_s += time.perf_counter() - start
        self.num_steps += 1
        self.channel.send(reply)


def worker_main(model_dir: str, pp: int, index: int, addresses: list[str], dtype: str | None,
                device: str | None, num_threads: int | None,
                parent_pid: int | None = None) -> None:
    """Entry point of a stage process: load the stage, then serve until told to stop."""
    from gpu_runtime.loader import load_stage, plan_stages, resolve_dtype

    if num_threads:
        torch.set_num_threads(num_threads)
    config, specs, files = plan_stages(model_dir, pp)
    stage = load_stage(model_dir, specs[index], config, files, resolve_dtype(dtype, config),
                       device)
    channel = Channel(addresses[index], addresses[(index + 1) % pp])
    try:
        StageWorker(stage, channel).serve(parent_pid)
    finally:
        channel.close()


class PipelineRunner:
    """Stage 0's side of a pipeline: runs stage 0 here, the rest through the channel."""

    def __init__(self, stage: Stage, kv: KVCache, channel: Channel,
                 procs: list[subprocess.Popen]) -> None:
        assert stage.spec.is_first and not stage.spec.is_last, f"{stage.spec} is not stage 0"
        self.stage, self.kv, self.channel, self.procs = stage, kv, channel, procs
        self.wait_s = 0.0  # time stage 0 spent waiting for the rest of the pipeline

    @classmethod
    def start(cls, stage: Stage, kv: KVCache, model_dir: str, addresses: list[str] | None,
              dtype: str | None, device: str | None, num_threads: int | None) -> PipelineRunner:
        """Starts stages 1..pp-1 as child processes (when ``addresses`` is None; otherwise they
        run elsewhere and listen on ``addresses[1:]``) and waits until each holds its KV cache."""
        pp = stage.spec.num_stages
        spawn = addresses is None
        addresses = addresses or ipc_addresses(pp)
        procs = [_start_worker(model_dir, pp, i, addresses, dtype, device, num_threads)
                 for i in range(1, pp)] if spawn else []
        runner = cls(stage, kv, Channel(addresses[0], addresses[1]), procs)
        try:
            runner._handshake(KVLayout(kv.spec.num_blocks, kv.spec.block_size))
        except BaseException:
            runner._stop_procs()
            raise
        return runner

    def _handshake(self, layout: KVLayout) -> None:
        self.channel.send(Message("init", {"num_blocks": layout.num_blocks,
                                           "block_size": layout.block_size}))
        reply = self._recv(READY_TIMEOUT_S)
        ready = reply.meta.get("ready")
        assert reply.kind == "init" and ready == list(range(1, self.stage.spec.num_stages)), (
            f"pipeline handshake answered {reply.kind!r} with ready stages {ready}")

    def _recv(self, timeout_s: float) -> Message:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.channel.recv(STEP_POLL_MS)
            if msg is not None:
                return msg
            dead = [(i + 1, p.returncode) for i, p in enumerate(self.procs)
                    if p.poll() is not None]
            if dead:
                raise ChannelError(f"pipeline stage process(es) exited (stage, code): {dead}")
        raise ChannelError(f"no answer from the pipeline within {timeout_s:.0f}s")

    @torch.inference_mode()
    def execute(self, step: StepBatch) -> Sampled:
        return self.execute_then(step, None)[0]

    @torch.inference_mode()
    def execute_then(self, step: StepBatch, then: Message | None) -> tuple[Sampled,
                                                                          Message | None]:
        """Runs a step and, right behind it on the ring, the message ``then`` (each stage
        handles it once it has passed the step on); returns the step's tokens and ``then`` as
        it came back."""
        hidden = run_stage(self.stage, self.kv, step.input_ids, step)
        self.channel.send(step_message(step, hidden))
        if then is not None:
            self.channel.send(then)
        start = time.perf_counter()
        reply = self._recv(READY_TIMEOUT_S)
        self.wait_s += time.perf_counter() - start
        assert reply.kind == "tokens", f"expected tokens from the last stage, got {reply.kind!r}"
        back = None
        if then is not None:
            back = self._recv(READY_TIMEOUT_S)
            assert back.kind == then.kind, f"expected {then.kind!r} back, got {back.kind!r}"
        return Sampled(**reply.meta), back

    def request(self, msg: Message, timeout_s: float = READY_TIMEOUT_S) -> Message:
        """Sends ``msg`` around the ring (between steps) and returns it as it came back."""
        self.channel.send(msg)
        back = self._recv(timeout_s)
        assert back.kind == msg.kind, f"expected {msg.kind!r} back, got {back.kind!r}"
        return back

    def stats(self) -> list[dict]:
        """Per-stage compute seconds and step counts of the other stages."""
        return self.request(Message("stats"), 60.0).meta.get("stages", [])

    def close(self, why: dict | None = None) -> None:
        """Stops the ring; ``why`` travels with the ``stop`` (e.g. that it consolidated)."""
        try:
            self.channel.send(Message("stop", why or {}))
            self._recv(10.0)
        except ChannelError:
            pass  # a stage already gone; the join below cleans up
        self._stop_procs()
        self.channel.close()

    def _stop_procs(self) -> None:
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(timeout=10)


def _start_worker(model_dir: str, pp: int, index: int, addresses: list[str], dtype: str | None,
                  device: str | None, num_threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpu_runtime.pipeline", "--model", str(model_dir), "--pp",
           str(pp), "--stage", str(index), "--addresses", ",".join(addresses)]
    for flag, value in (("--dtype", dtype), ("--device", device), ("--threads", num_threads),
                        ("--parent-pid", os.getpid())):
        if value:
            cmd += [flag, str(value)]
    # the package root on the path, so a child finds gpu_runtime however the parent was started
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.update({k: v for k, v in STAGE_ENV.items() if k not in os.environ})
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    """Runs one stage by hand, e.g. on another host: ``--addresses`` lists every stage's
    listening address (tcp://host:port), stage 0's first."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--addresses", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="exit when this process is gone (set when stage 0 starts the stage)")
    args = ap.parse_args(argv)
    addresses = args.addresses.split(",")
    assert len(addresses) == args.pp and 1 <= args.stage < args.pp, (
        f"{len(addresses)} addresses for pp={args.pp}, stage {args.stage}")
    worker_main(args.model, args.pp, args.stage, addresses, args.dtype, args.device,
                args.threads or int(os.environ.get("HYDRA_THREADS", "0")) or None,
                args.parent_pid)


if __name__ == "__main__":
    main()
