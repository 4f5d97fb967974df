import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from mixprec import gradstats
from mixprec.gradstats import KINDS, fp16_fractions, log2_edges, log2_histogram, main
from mixprec.models import build_model

VALUES = torch.tensor([0.0, 2.0**-40, 2.0**-30, 2.0**-20, 2.0**-10, 1.0, 100.0, 1e5])


@pytest.mark.parametrize("scale, expected", [
    # 2^-40 and 2^-30 fall below 2^-24; 2^-20 is subnormal; 1e5 > 65504
    (1.0, {"zero": 1 / 8, "underflow_to_zero": 2 / 8, "subnormal": 1 / 8, "overflow": 1 / 8}),
    # x 2^10: 2^-40 -> 2^-30 still underflows, 2^-30 -> 2^-20 subnormal, 2^-20 -> 2^-10 normal,
    # 100 -> 102400 and 1e5 overflow
    (2.0**10, {"zero": 1 / 8, "underflow_to_zero": 1 / 8, "subnormal": 1 / 8, "overflow": 2 / 8}),
])
def test_fp16_fractions_of_known_values(scale, expected):
    assert fp16_fractions(VALUES, scale) == {"elements": 8, **expected}
    assert fp16_fractions(-VALUES, scale) == {"elements": 8, **expected}  # magnitudes only


def test_fp16_fractions_at_the_range_boundaries():
    # 2^-24 is the smallest subnormal (kept), 2^-14 the smallest normal, 65504 the largest finite
    edges = torch.tensor([2.0**-24, 2.0**-14, 65504.0])
    assert fp16_fractions(edges, 1.0) == {"elements": 3, "zero": 0.0, "underflow_to_zero": 0.0,
                                          "subnormal": 1 / 3, "overflow": 0.0}


def test_log2_histogram_bins_and_edges():
    values = torch.tensor([0.0, 2.0**-30, -1.5 * 2.0**-30, 2.0**-20, 1.0, -1.0, 2.0**-60])
    edges = log2_edges(values, torch.tensor([2.0**25]))
    assert edges[0] == -60 and edges[-1] == 26  # spans the data beyond the -40..20 floor, in [k, k+1) bins
    counts = dict(zip(edges[:-1], log2_histogram(values, edges)))
    assert counts[-60] == 1 and counts[-30] == 2 and counts[-20] == 1 and counts[0] == 2
    assert sum(counts.values()) == 6  # the zero is left out
    assert list(log2_edges(torch.zeros(3))) == list(range(-40, 21))


def test_end_to_end_on_synthetic_data(tiny_cifar, tmp_path, capsys, monkeypatch):
    # count the model's nonzero parameter-gradient elements straight from .grad, beside gradstats' own path
    seen = {}

    def spy(model, x, y):
        grads = real_capture(model, x, y)
        seen["nonzero weight grads"] = sum(int(torch.count_nonzero(p.grad)) for p in model.parameters())
        return grads

    real_capture = gradstats.capture_gradients
    monkeypatch.setattr(gradstats, "capture_gradients", spy)
    out = tmp_path / "out"
    args = ["--model", "resnet20", "--data", str(tiny_cifar["pickles"]), "--batch-size", "32", "--device", "cpu",
            "--out", str(out)]
    assert main(args) == 0
    assert (out / "gradstats-resnet20.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in out.iterdir()) == [  # and no temporary file left behind
        "gradstats-resnet20-fractions.csv", "gradstats-resnet20.csv", "gradstats-resnet20.png"]
    hist = pd.read_csv(out / "gradstats-resnet20.csv")
    fractions = pd.read_csv(out / "gradstats-resnet20-fractions.csv")
    assert list(hist.columns) == ["kind", "log2_low", "log2_high", "count"]
    assert (hist.log2_high - hist.log2_low == 1).all() and hist.log2_low.min() <= -40 and hist.log2_high.max() >= 20
    assert sorted(fractions.scale.unique()) == [1.0, 65536.0] and set(fractions.kind) == set(KINDS)
    frac_columns = ["zero", "underflow_to_zero", "subnormal", "overflow"]
    assert ((fractions[frac_columns] >= 0) & (fractions[frac_columns] <= 1)).all().all()
    for kind in KINDS:
        row = fractions[fractions.kind == kind].iloc[0]
        nonzero = row.elements - round(row.zero * row.elements)
        assert hist[hist.kind == kind]["count"].sum() == nonzero > 0
    # per image: 16x32x32 outputs of the stem's conv, bn, relu and 3 blocks x (conv, bn, relu) x 2 (21),
    # 32x16x16 and 64x8x8 outputs of 18 + 2 (downsample conv, bn) each, and 10 logits
    activations = fractions[fractions.kind == "activation"].iloc[0]
    assert activations.elements == 32 * (21 * 16 * 32 * 32 + 20 * 32 * 16 * 16 + 20 * 64 * 8 * 8 + 10)
    weights = fractions[fractions.kind == "weight"].iloc[0]
    assert weights.elements == sum(p.numel() for p in build_model("resnet20").parameters())
    assert hist[hist.kind == "weight"]["count"].sum() == seen["nonzero weight grads"]
    shown = capsys.readouterr().out
    assert "underflow_to_zero" in shown and "gradstats-resnet20.png" in shown


def test_bad_batch_size_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixprec.gradstats", "--batch-size", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mixprec.gradstats: error: --batch-size"), proc.stderr


def test_survey_figures_of_known_gradients():
    """Six elements: one zero, one below 2^-24 (0 in FP16), one subnormal, three normal; the largest 4. The
    smallest scale lifting 99.9% of the five nonzero ones must lift the smallest, 2^-30, to 2^-14: 2^16."""
    sums = gradstats.LayerSums()
    sums.add("conv", "activation", torch.tensor([0.0, 2.0**-30, 2.0**-20, 2.0**-10, 1.0, -4.0]))
    view = gradstats.fp16_view(**{k: v for k, v in sums.sums["conv", "activation"].items()})
    assert view["elements"] == 6 and view["zero_frac"] == 1 / 6
    assert view["underflow_frac"] == 1 / 6 and view["subnormal_frac"] == 1 / 6
    assert view["below_normal_of_nonzero"] == 2 / 5
    assert view["min_scale_log2"] == 16 and view["max_scale_log2"] == math.log2(65504 / 4)
    assert view["window_binades"] == pytest.approx(math.log2(65504 / 4) - 16)


def test_survey_on_synthetic_data_agrees_with_the_exact_fractions(tiny_cifar, tmp_path):
    out = tmp_path / "out"
    args = ["--models", "resnet20", "--data", str(tiny_cifar["pickles"]), "--batch-size", "16", "--steps", "2",
            "--train-batch-size", "8", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert sorted(f.name for f in out.iterdir()) == ["survey-layers.csv", "survey.csv", "survey.md", "survey.png"]
    totals = pd.read_csv(out / "survey.csv")
    assert list(totals.point.unique()) == ["init", "after 2 steps"] and set(totals.kind) == {*KINDS, "all"}
    act = totals[(totals.point == "init") & (totals.kind == "activation")].iloc[0]
    assert act.elements == 16 * (21 * 16 * 32 * 32 + 20 * 32 * 16 * 16 + 20 * 64 * 8 * 8 + 10)  # as above
    # the same batch and initial weights, through the exact path of the one-model figure
    from mixprec.data import CifarLoader, load_cifar10, make_splits

    splits = make_splits(load_cifar10(tiny_cifar["pickles"]))
    torch.manual_seed(0)
    model = build_model("resnet20").train()
    x, y = next(iter(CifarLoader(*splits.train, 16, train=True, device="cpu", seed=0)))
    exact = gradstats.fp16_fractions(gradstats.capture_gradients(model, x, y)["activation"], 1.0)
    assert act.zero_frac == pytest.approx(exact["zero"], abs=1e-9)
    assert act.underflow_frac == pytest.approx(exact["underflow_to_zero"], abs=1e-12)  # counts: exact
    assert act.subnormal_frac == pytest.approx(exact["subnormal"], abs=1e-12)
    layers = pd.read_csv(out / "survey-layers.csv")
    assert layers.groupby(["point", "kind"]).elements.sum()["init", "activation"] == act.elements
    text = (out / "survey.md").read_text()
    assert text.count("| resnet20 | init | `") == text.count("| resnet20 | after 2 steps | `") == 5
