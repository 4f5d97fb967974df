"""Checkpoints: everything a run needs to go on after an interruption (``--resume``), in one list.

A checkpoint is a dict, written as ``checkpoint.pt`` at every epoch's end (and before the first, and
where a SIGINT/SIGTERM stopped the run). Besides its position (``epoch``, the epochs done, and
``partial_epoch``, the progress of an epoch that an interruption cut short), it holds the parts that
:func:`_parts` lists, each with how it is read and how it is set back: :func:`save` writes them and
:func:`restore` reads them, both from that one list.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import device as dev
from .cli import UsageError
from .results import read_json

RESULT_PROGRESS = ("epochs", "steps", "tables", "train_time_s", "train_images", "warmup_time_s", "warmup_images",
                   "skipped_steps")  # the RunResult fields a resumed run goes on adding to
LOOP_PROGRESS = ("best_val_acc", "last_finite_loss")  # and the loop's own


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached_gaussian": cached}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def _state_dict_of(obj) -> tuple[Callable[[], object], Callable[[object], None]]:
    if obj is None:  # a part this run does not have: saved as None
        return (lambda: None), (lambda state: None)
    return obj.state_dict, obj.load_state_dict


def _parts(loop) -> dict[str, tuple[Callable[[], object], Callable[[object], None]]]:
    """What a checkpoint of ``loop`` (a :class:`mixprec.train.Loop`) holds besides its position, in the order
    it is restored: for each key, how to read the part and how to set it back."""
    p = loop.precision
    progress = (lambda: {**{k: getattr(loop.result, k) for k in RESULT_PROGRESS},
                         **{k: getattr(loop, k) for k in LOOP_PROGRESS}})

    def set_progress(state: dict) -> None:
        for key in RESULT_PROGRESS:  # a field newer than the checkpoint keeps its (empty) start
            if key in state:
                setattr(loop.result, key, state[key])
        for key in LOOP_PROGRESS:
            setattr(loop, key, state[key])

    return {
        "model": _state_dict_of(loop.model),
        "master": _state_dict_of(p.master),  # FP32 masters, the rounding generator or Kahan buffers; else None
        "optimizer": _state_dict_of(p.optimizer),
        "scaler": _state_dict_of(p.scaler),
        "fp8": _state_dict_of(p.fp8),  # amax histories, scales
        "telemetry": (lambda: {s.key: s.state_dict() for s in p.telemetry if hasattr(s, "state_dict")},
                      lambda state: [s.load_state_dict(state[s.key]) for s in p.telemetry if s.key in state]),
        "scheduler": _state_dict_of(loop.scheduler),
        "rng": (lambda: dev.rng_states(loop.device), lambda state: dev.set_rng_states(loop.device, state)),
        "numpy_rng": (_numpy_state, _set_numpy_state),
        "python_rng": (random.getstate, random.setstate),
        "progress": (progress, set_progress),
    }


def save(loop, epochs_done: int, partial_epoch: dict | None = None) -> dict:
    """The checkpoint of ``loop`` after ``epochs_done`` epochs (and ``partial_epoch``'s steps of the next)."""
    return {"epoch": epochs_done, "partial_epoch": partial_epoch,
            **{key: read() for key, (read, _) in _parts(loop).items()}}


def restore(loop, state: dict) -> int:
    """Set ``loop`` back to the checkpoint ``state``; returns the epoch to go on with. A part saved as
    None (or missing, from a checkpoint older than the part) is left as it is."""
    for key, (_, write) in _parts(loop).items():
        if state.get(key) is not None:
            write(state[key])
    return state["epoch"]


def position(state: dict, epochs: int) -> str:
    """Where a run resumed from the checkpoint ``state`` goes on, of its ``epochs``, for the log: ``"in epoch
    2 of 3, after step 7 of 15"`` (an interruption mid-epoch), ``"at the start of epoch 2 of 3"`` (at an
    epoch's end) or ``"after its last epoch (3 of 3), at the test evaluation"``."""
    done, partial = state["epoch"], state.get("partial_epoch")
    if partial is not None:
        return (f"in epoch {done + 1} of {epochs}, after step {partial['steps_done']} of "
                f"{len(partial['losses'])}")
    if done >= epochs:
        return f"after its last epoch ({done} of {epochs}), at the test evaluation"
    return f"at the start of epoch {done + 1} of {epochs}"


def best(state: dict, val_acc: float) -> dict:
    """``best.pt``: the weights of the checkpoint ``state``, whose epoch had the best validation accuracy."""
    return {"epoch": state["epoch"], "val_acc": val_acc, "model": state["model"], "master": state["master"]}


def load(run_dir: Path, epochs: int) -> dict:
    """The checkpoint of the run in ``run_dir``, to resume it to ``epochs`` epochs; a :class:`UsageError` when
    there is none to resume from (the run completed its own epochs and ``epochs`` does not extend it, or its
    checkpoint is missing or unreadable). A completed run's checkpoint is its last epoch's, so a larger
    ``epochs`` goes on from there (``--resume --epochs``, checked by :func:`mixprec.config.check_extension`)."""
    if (run_dir / "summary.json").exists() and read_json(run_dir / "summary.json").get("status") == "completed":
        own = read_json(run_dir / "config.json")["epochs"]
        if epochs <= own:
            raise UsageError(f"--resume {run_dir}: that run has already completed its {own} epochs; extend it with "
                             f"--epochs N (more than {own}), or start a new run")
    try:
        return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume {run_dir}: no checkpoint.pt in it; start a new run") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so, on one line
        raise UsageError(f"--resume {run_dir}: checkpoint.pt cannot be read ({type(e).__name__}); "
                         "start a new run") from None
