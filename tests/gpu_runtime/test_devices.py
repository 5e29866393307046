"""Device names and the small helpers every backend shares (CPU here; CUDA on a GPU run)."""

from __future__ import annotations

import pytest
import torch

from gpu_runtime.devices import DeviceNameError, copy_into, cpu_device_count, cpu_slice


def test_cpu_devices_are_counted_among_a_nodes_names():
    assert cpu_device_count(["cpu:0", "cpu:1", "cuda:0"]) == 2
    assert cpu_device_count(["cuda:0", "cuda:1"]) == 1  # CPU work still has every core
    assert cpu_device_count([]) == 1
    with pytest.raises(DeviceNameError):
        cpu_device_count(["tpu:0"])


def test_cpu_slices_split_the_cores_and_share_them_when_too_few():
    assert cpu_slice(1, 2, [0, 1, 2, 3]) == [2, 3]
    assert [cpu_slice(i, 3, [4, 5]) for i in range(3)] == [[4], [5], [4]]


def test_copy_into_copies_into_a_view_of_the_destination():
    dst = torch.zeros(2, 4, dtype=torch.long)
    copy_into(dst[:, :3], torch.arange(6).reshape(2, 3))
    assert dst.tolist() == [[0, 1, 2, 0], [3, 4, 5, 0]]
    if torch.cuda.is_available():
        on_gpu = torch.zeros(3, dtype=torch.long, device="cuda")
        copy_into(on_gpu, torch.tensor([7, 8, 9]))
        assert on_gpu.tolist() == [7, 8, 9]
