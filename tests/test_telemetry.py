"""The telemetry protocol: sources name their columns, the loop carries them without knowing them, and
checkpoints from before the protocol still resume."""

import math

import pandas as pd
import torch
from torch.overrides import TorchFunctionMode

from mixprec import steps, telemetry
from mixprec.config import RunConfig
from mixprec.data import load_cifar10, make_splits
from mixprec.fp8 import COLUMNS as FP8_COLUMNS
from mixprec.master import COLUMNS as UPDATE_COLUMNS
from mixprec.master import LostUpdateTelemetry
from mixprec.scaler import COLUMNS as GRAD_COLUMNS
from mixprec.scaler import GradientTelemetry
from mixprec.steps import Precision
from mixprec.telemetry import Telemetry
from tests.conftest import train_keeping_checkpoint

STEPS_CSV_STATS = [*GRAD_COLUMNS, *FP8_COLUMNS, *UPDATE_COLUMNS]  # steps.csv's order, as the report reads it


class StopAfter:
    """A stop event that is set from its ``n``-th check on (the loop checks before each epoch and after each step)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{**dict(model="resnet20", epochs=1, batch_size=32, device="cpu"), **kw})  # 5 steps


class WeightTelemetry(Telemetry):
    """A statistic the package does not have: the largest |weight| and the fraction of zero weights after
    each step, measured from the FP32 weights (a count, divided in :meth:`to_row`)."""

    key, columns = "weights", ("weight_max_abs", "weight_zero_frac")

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.params = params

    @torch.no_grad()
    def measure(self) -> None:
        largest = torch.stack([p.abs().max() for p in self.params]).max()
        zeros = sum(p.numel() - torch.count_nonzero(p) for p in self.params)
        elements = sum(p.numel() for p in self.params)
        self.record(torch.stack([largest, zeros.float(), torch.tensor(float(elements))]))

    def to_row(self, values: list[float]) -> dict[str, float]:
        largest, zeros, elements = values
        return {"weight_max_abs": largest, "weight_zero_frac": zeros / elements}


def test_a_new_statistic_is_one_class_and_reaches_steps_csv_and_checkpoints(tiny_cifar, monkeypatch):
    """One Telemetry subclass, added to the Precision where the mode is set up: its columns land in the
    step rows after the standard ones, and an interrupted run carries them through its checkpoint."""
    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    setup, sources = steps.PRECISIONS["baseline"], []

    def baseline_with_weights(cfg, model, net, device, options):
        precision = setup(cfg, model, net, device, options)
        source, step = WeightTelemetry(list(model.parameters())), precision.step

        def step_and_measure(images, labels):
            out = step(images, labels)
            source.measure()  # after the optimizer step: the weights the next step starts from
            return out

        precision.step = step_and_measure
        precision.telemetry.append(source)
        sources.append(source)
        return precision

    monkeypatch.setitem(steps.PRECISIONS, "baseline", baseline_with_weights)
    cfg = _cfg(mode="baseline")
    full, _ = train_keeping_checkpoint(cfg, splits)
    rows = pd.DataFrame(full.steps)
    assert list(rows.columns) == ["step", "epoch", "loss", "lr", "loss_scale", "skipped", *STEPS_CSV_STATS,
                                  "weight_max_abs", "weight_zero_frac"]
    assert rows[STEPS_CSV_STATS].isna().all().all()  # baseline measures none of the standard statistics
    assert (rows.weight_max_abs > 0).all() and rows.weight_zero_frac.between(0, 1).all()
    assert rows.weight_max_abs.nunique() > 1  # measured at each step, not once
    final = max(p.detach().abs().max().item() for p in sources[-1].params)
    assert rows.weight_max_abs.iloc[-1] == final

    cut, mid = train_keeping_checkpoint(cfg, splits, stop=StopAfter(3))  # checks: before the epoch, after step 1, after step 2
    assert cut.status == "interrupted" and mid["partial_epoch"]["steps_done"] == 2
    assert sorted(mid["partial_epoch"]["stats"]) == [0, 1]
    assert all(set(s) == {"weights"} for s in mid["partial_epoch"]["stats"].values())
    resumed, _ = train_keeping_checkpoint(cfg, splits, resume=mid)
    pd.testing.assert_frame_equal(pd.DataFrame(resumed.steps), rows)


def test_checkpoints_from_before_the_protocol_still_resume(tiny_cifar):
    """A partial epoch saved with one dict per source (grad_stats, fp8_stats, update_stats) resumes to the
    same steps.csv rows as an uninterrupted run, its measured steps included."""
    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    cfg = _cfg(mode="manual", master_weights="none", telemetry_every=2, deterministic=True)
    full, _ = train_keeping_checkpoint(cfg, splits)
    cut, mid = train_keeping_checkpoint(cfg, splits, stop=StopAfter(4))  # after step 3, the second measured one
    partial = mid["partial_epoch"]
    stats = partial.pop("stats")
    assert sorted(stats) == [0, 2] and all(set(s) == {"grad_stats", "update_stats"} for s in stats.values())
    for key in telemetry.LEGACY_KEYS:  # as the loop saved them before
        partial[key] = {step: s[key] for step, s in stats.items() if key in s}
    resumed, _ = train_keeping_checkpoint(cfg, splits, resume=mid)
    rows = pd.DataFrame(resumed.steps)
    pd.testing.assert_frame_equal(rows, pd.DataFrame(full.steps))
    assert rows.loc[[0, 2], [*GRAD_COLUMNS, *UPDATE_COLUMNS]].notna().all().all()  # from the old keys


def test_stats_row_keeps_steps_csv_columns_and_nan_where_nothing_was_measured():
    precision = Precision(step=None, forward=None, optimizer=None, loss_scale=lambda: None)
    assert precision.pop_stats() == {}
    blank = precision.stats_row({})
    assert list(blank) == STEPS_CSV_STATS and all(math.isnan(v) for v in blank.values())
    grads, updates = GradientTelemetry(), LostUpdateTelemetry()
    precision.telemetry += [grads, updates]
    grads.record(torch.tensor([3.0, 2.0, 1.0, 8.0]))  # largest, zeros, underflows, elements
    measured = telemetry.to_host({0: precision.pop_stats()})[0]
    assert precision.pop_stats() == {}  # popped
    row = precision.stats_row(measured)
    assert list(row) == STEPS_CSV_STATS
    assert (row["grad_max_abs"], row["grad_zero_frac"], row["grad_underflow_frac"]) == (3.0, 0.25, 0.125)
    assert all(math.isnan(row[c]) for c in [*FP8_COLUMNS, *UPDATE_COLUMNS])
    assert updates.to_row([1.0, 4.0, 0.0, 0.0]) == {"update_lost_frac": 0.25, "decay_lost_frac": 0.0}


def test_to_host_reads_every_step_and_source_in_one_transfer():
    stats = {0: {"a": torch.tensor([0.1, 2.0**-30]), "b": torch.tensor([3.0], dtype=torch.float64)},
             4: {"b": torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)}}
    reads = []

    class CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"tolist", "item", "cpu", "numpy", "__float__", "__bool__"}:
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with CountReads():
        host = telemetry.to_host(stats)
    assert reads == ["tolist"]
    # float32 values come back exactly (0.1 as float32 is not 0.1)
    assert host == {0: {"a": stats[0]["a"].tolist(), "b": [3.0]}, 4: {"b": [5.0, 6.0, 7.0]}}
    assert host[0]["a"][0] != 0.1 and telemetry.to_host({}) == {}
