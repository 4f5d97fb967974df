"""Where training memory goes, measured rather than computed from formulas."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_tensor_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, each storage once.

    These are the activations a training step keeps alive between forward and backward: the part of
    memory that half precision halves. Views of one storage (an in-place ReLU's output, a reshape)
    count once.

    Example::

        saved_tensor_bytes(lambda: model(images))  # resnet20, batch 128, FP32: ~193 MiB
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
