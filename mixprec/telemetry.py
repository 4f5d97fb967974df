"""The one protocol of the per-step statistics that ``steps.csv`` carries beside the loss.

A measurement belongs to the code that makes it: the loss scaler measures the gradients it unscales
(:class:`~mixprec.scaler.GradientTelemetry`), the master weights what rounding loses without them
(:class:`~mixprec.master.LostUpdateTelemetry`), the FP8 layers what their casts saturate and flush
(:class:`~mixprec.fp8.Fp8Telemetry`). Each such source is a :class:`Telemetry`: it names its ``columns``,
hands over what it measured at a step as one device tensor (:meth:`Telemetry.pop`), and turns that
tensor's values, once they are on the host, into its columns (:meth:`Telemetry.to_row`).

The training loop knows none of them. It asks the :class:`~mixprec.steps.Precision` for
``pop_stats()`` after every step, keeps what comes back on the device, keyed by step, and at the
epoch's end reads it all in one transfer (:func:`to_host`, the one host sync) and has the Precision
turn each step's values into columns. A new statistic is one subclass, made where it is measured and
added to its Precision's ``telemetry``; nothing in the loop or the checkpoint changes.

A source whose measurement is too wide for columns (one value per layer, say) names a ``table`` instead:
its rows go to ``<table>.csv`` in the run directory, one per value it measured at a step, and
:meth:`Telemetry.to_rows` makes them (:class:`~mixprec.layerstats.LayerGradientTelemetry`). A source
with state that must survive a resume (a step counter) has ``state_dict`` and ``load_state_dict``,
which the checkpoint saves under its ``key``.
"""

from __future__ import annotations

import math

import torch

# Before this protocol a checkpoint's partial epoch kept one {step: tensor} dict per source, under these
# keys; :func:`restored` regroups them by step under the same keys, which is why the scaler's, the FP8
# layers' and the master weights' sources keep them as their ``key``.
LEGACY_KEYS = ("grad_stats", "fp8_stats", "update_stats")


class Telemetry:
    """A source of per-step statistics: ``columns`` in ``steps.csv``, ``pop()`` and ``to_row(values)``.

    A subclass sets ``key`` (unique among a run's sources: it names the source's tensor in
    ``Precision.pop_stats()`` and in a checkpoint) and ``columns``; it calls :meth:`record` with one
    device tensor on a step it measures, or overrides :meth:`pop` if it adds up over a step. The
    default :meth:`to_row` puts the tensor's values into the columns in order; a source that
    measures counts overrides it to divide them. A step that measured nothing has NaN in every
    column (:meth:`unmeasured`).

    Example::

        class LargestWeight(Telemetry):
            key, columns = "largest_weight", ("weight_max_abs",)

        largest = LargestWeight()
        precision.telemetry.append(largest)   # steps.csv now has a weight_max_abs column
        ...                                   # and on a step that measures:
        largest.record(torch.stack([p.abs().max() for p in params]).max().reshape(1))
    """

    key: str = ""
    columns: tuple[str, ...] = ()
    table: str | None = None  # a source of rows rather than columns: the name of its <table>.csv

    def __init__(self):
        self._measured: torch.Tensor | None = None

    def record(self, stats: torch.Tensor) -> None:
        """Keep ``stats`` (a device tensor, one value per column unless :meth:`to_row` says otherwise)
        for :meth:`pop`; nothing waits for the device."""
        self._measured = stats

    def pop(self) -> torch.Tensor | None:
        """What was measured since the last pop, as one device tensor, or None if nothing was."""
        stats, self._measured = self._measured, None
        return stats

    def to_row(self, values: list[float]) -> dict[str, float]:
        """``steps.csv``'s columns of a measured step, from the values of :meth:`pop`'s tensor."""
        return dict(zip(self.columns, values, strict=True))

    def to_rows(self, values: list[float]) -> list[dict]:
        """The ``table``'s rows of a measured step (the loop adds the ``step``), from :meth:`pop`'s values."""
        raise NotImplementedError(f"{type(self).__name__} has no table")

    @classmethod
    def unmeasured(cls) -> dict[str, float]:
        """The columns of a step that measured nothing (or of a run without this source): NaN."""
        return dict.fromkeys(cls.columns, math.nan)


def to_host(stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, list[float]]]:
    """``{step: {key: device tensor}}`` as ``{step: {key: list of floats}}``, in one transfer (a host
    sync). The tensors are widened to float64 for it, which every float32 value survives exactly."""
    flat = [(step, key, t.flatten()) for step, by_key in stats.items() for key, t in by_key.items()]
    if not flat:
        return {}
    values = torch.cat([t.double() for _, _, t in flat]).tolist()  # host sync: the epoch's one read
    out, at = {}, 0
    for step, key, t in flat:
        out.setdefault(step, {})[key] = values[at: at + t.numel()]
        at += t.numel()
    return out


def saved(stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """``stats`` for a checkpoint's partial epoch: the same, on the CPU."""
    return {step: {key: t.cpu() for key, t in by_key.items()} for step, by_key in stats.items()}


def restored(partial: dict, device: torch.device) -> dict[int, dict[str, torch.Tensor]]:
    """The statistics of a checkpoint's partial epoch, on ``device``: its ``stats``, or, from a
    checkpoint written before this protocol, its one dict per source (:data:`LEGACY_KEYS`)."""
    stats = {int(step): {key: t.to(device) for key, t in by_key.items()}
             for step, by_key in partial.get("stats", {}).items()}
    for key in LEGACY_KEYS:
        for step, t in partial.get(key, {}).items():
            stats.setdefault(int(step), {})[key] = t.to(device)
    return stats
