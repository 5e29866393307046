"""A worker-like reader process for the multi-process prefetch tests (not collected by pytest).

Protocol on stdin/stdout, one JSON document per line:
  -> prints {"ready": true} once torch is imported
  <- {"handle": ..., "entries": [...]}   -> reads every tensor as it arrives, prints what it saw
  <- "measure"                           -> prints Rss/Pss of the buffer's mapping (smaps)
  <- "exit"                              -> closes the buffer and exits
"""

from __future__ import annotations

import json
import sys
import zlib

import torch

from gpu_runtime.checkpoint import TensorEntry
from gpu_runtime.prefetch import BufferHandle, iter_tensors, open_buffer
from gpu_runtime.store import plan_stage


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mapping_of(addr: int) -> dict:
    """The /proc/self/smaps record of the mapping holding ``addr``."""
    record: dict = {}
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                record = {"lo": lo, "hi": hi, "offset": int(head[2], 16), "dev": head[3],
                          "inode": int(head[4]), "hit": lo <= addr < hi}
            elif record.get("hit") and head[0] in ("Rss:", "Pss:", "Private_Clean:",
                                                    "Private_Dirty:"):
                record[head[0][:-1]] = int(head[1])
                if head[0] == "Private_Dirty:":
                    return record
    raise AssertionError(f"no mapping holds address {addr:#x}")


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    msg = json.loads(sys.stdin.readline())
    handle = BufferHandle.from_dict(msg["handle"])
    entries = [TensorEntry(**(e | {"shape": tuple(e["shape"])})) for e in msg["entries"]]
    layout = plan_stage(entries)
    ends = {p.name: p.buffer_end for p in layout.placements}
    anon_before = status_kb("RssAnon")
    buf = open_buffer(handle)
    seen, tensors = [], []
    for name, t in iter_tensors(buf, layout, timeout_s=60):
        mark = buf.progress().mark
        crc = zlib.crc32(t.view(torch.uint8).numpy())  # reads the shared pages in place
        seen.append({"name": name, "mark": mark, "end": ends[name],
                     "crc_ok": crc == next(e.crc32 for e in entries if e.name == name),
                     "inside": buf.address <= t.data_ptr() < buf.address + handle.size})
        tensors.append(t)
    print(json.dumps({"seen": seen, "anon_growth_kb": status_kb("RssAnon") - anon_before,
                      "address": buf.address}), flush=True)
    assert sys.stdin.readline().strip() == '"measure"'
    print(json.dumps(mapping_of(buf.address)), flush=True)
    assert sys.stdin.readline().strip() == '"exit"'
    del tensors, t
    buf.close()


if __name__ == "__main__":
    main()
