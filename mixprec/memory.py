"""Where training memory goes, measured rather than computed from formulas."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class SavedTensorBytes:
    """Counts the bytes of the tensors autograd saves for backward inside a ``with`` block.

    These are the activations a training step keeps alive between forward and backward: the part of
    memory that half precision halves. Each storage counts once, so views (an in-place ReLU's
    output, a reshape) are not counted twice. The tensors themselves are left untouched.

    Example::

        with SavedTensorBytes() as saved:
            loss = model(images).sum()
        saved.bytes  # resnet20, batch 128, FP32: ~193 MiB
    """

    def __enter__(self) -> SavedTensorBytes:
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(self._storages.values())


def saved_tensor_bytes(forward: Callable[[], object]) -> int:
    """Bytes saved for backward while ``forward()`` runs (see :class:`SavedTensorBytes`)."""
    with SavedTensorBytes() as saved:
        forward()
    return saved.bytes


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def breakdown(model: torch.nn.Module, master, optimizer: torch.optim.Optimizer, activations: int) -> dict:
    """Bytes by role after a training step: the model the forward pass uses (parameters and buffers), FP32
    master weights (``--master-weights fp32``; 0 otherwise), gradients (the model's, and the FP32 ones of
    whatever the optimizer steps in their stead), optimizer state (momentum buffers), ``activations`` as
    measured by :class:`SavedTensorBytes`, Kahan compensation buffers (``kahan``), and the FP32 working copies
    that the optimizer steps with ``stochastic`` and ``kahan`` (``update_workspace``: allocated for the optimizer
    step only, widened from the half weights, and freed after it; a fused step would not need them). ``master``
    is a :class:`~mixprec.master.MasterWeights`, or None outside manual mode."""
    own = master is not None and master.params is not master.model_params  # FP32 Parameters of its own
    return {
        "weights": tensor_bytes([*model.parameters(), *model.buffers()]),
        "master_weights": tensor_bytes(master.master_params) if master is not None else 0,
        "grads": tensor_bytes(p.grad for p in model.parameters())
        + (tensor_bytes(m.grad for m in master.params) if own else 0),
        "optimizer_state": tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                                        if isinstance(v, torch.Tensor)),
        "activations": activations,
        "compensation": tensor_bytes(master.compensation) if master is not None else 0,
        "update_workspace": master.workspace_bytes if master is not None else 0,
    }
