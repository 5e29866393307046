"""A node's cache served to its peers by byte range: a peer fetches a stage from another
node's cache (no store involved), bit for bit and checksum-verified, and a range the cache does
not hold is a 404 the fetcher reports."""

from __future__ import annotations

import pytest
import requests
import torch

from gpu_runtime.coldstart.stream import stage_entries
from gpu_runtime.config import parse_config
from gpu_runtime.prefetch import FetchFailedError, iter_tensors, open_buffer
from gpu_runtime.prefetch.peer import PeerServer
from gpu_runtime.stage import split_stages


@pytest.fixture
def halves(ckpt_index):
    config = parse_config(ckpt_index.config)
    specs = split_stages(config, ckpt_index.tensors, 2)
    return [stage_entries(ckpt_index.tensors, s) for s in specs]


def same_bytes(a_job, b_job) -> bool:
    """Every tensor of two buffers, bit for bit (the views are dropped before the close)."""
    with open_buffer(a_job.handle) as a, open_buffer(b_job.handle) as b:
        ours = dict(iter_tensors(b, b_job.layout, 30))
        same = all(torch.equal(t.view(torch.uint8), ours[name].view(torch.uint8))
                   for name, t in iter_tensors(a, a_job.layout, 30))
        del ours
    return same


def test_a_peer_fetches_a_stage_from_another_nodes_cache(make_prefetcher, store_server,
                                                         halves):
    holder, fetcher = make_prefetcher(), make_prefetcher()
    first = holder.prefetch("small", "pp2-s1", store_server.url + "/small", halves[1])
    first.wait(60)
    served_before = store_server.stats.get("bytes", 0)
    peer = PeerServer(holder).start()
    try:
        job = fetcher.prefetch("small", "pp2-s1", peer.url("small"), halves[1])
        job.wait(60)
        assert peer.bytes_served == job.layout.fetch_bytes > 0
        assert store_server.stats.get("bytes", 0) == served_before  # not one byte from the store
        assert same_bytes(first, job)
        # what the holder does not cache is not served: the fetch fails with the 404
        missing = fetcher.prefetch("small", "pp2-s0", peer.url("small"), halves[0])
        with pytest.raises(FetchFailedError, match="404"):
            missing.wait(60)
        bad = requests.get(f"{peer.url('small')}/x.safetensors", timeout=10)
        assert bad.status_code == 400  # no single byte range asked for
        first.release()
        job.release()
        missing.release()
    finally:
        peer.close()
