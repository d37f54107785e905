"""Moving the engine's small per-step tensors between host and device without stalling the device.

A decode step reads its sampled tokens back once (the step's one device sync) and sends its next inputs, its
mask and its mix over before the forward pass. On CUDA a copy from pageable host memory waits for the stream
to drain, and a read-back waits for it by definition; so host-to-device copies go through pinned memory
without blocking, and everything a step reads back comes over in one synchronisation. On the CPU both are
plain tensors, returned as they are.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """`t` (on the host) on `device`: pinned and non-blocking to CUDA; as it is when it is there already."""
    if device is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the host, after one synchronisation of the stream that computes them (none on the CPU)."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    cuda = {t.device for t in tensors if t.device.type == "cuda"}
    if cuda:
        out = tuple(t.to("cpu", non_blocking=True) if t.device.type == "cuda" else t for t in tensors)
        for dev in cuda:
            torch.cuda.current_stream(dev).synchronize()
        return out
    return tuple(t.cpu() for t in tensors)
