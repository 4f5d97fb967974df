import copy
import math

import pandas as pd
import pytest
import torch

from mixprec.bench_infer import main, prepare
from mixprec.models import build_model, count_params


def test_modes_compute_the_same_logits_in_their_precisions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = build_model("resnet20").eval()
    with torch.no_grad():
        reference = model(x)
        for mode in ("baseline", "amp", "manual"):
            forward, what = prepare(copy.deepcopy(model), mode, torch.device("cpu"))
            out = forward(x)
            assert out.dtype == torch.float32 and out.shape == (2, 10)
            assert torch.allclose(out, reference, atol=0.1 if mode == "amp" else 0.02), mode
    assert what == {"dtype": "float16", "half_compute": "emulated"}


def test_writes_one_row_per_model_and_mode_and_appends(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    args = ["--model", "resnet20", "mobilenet_v2", "--image-size", "32", "--repeats", "3", "--warmup", "1",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 6 and set(zip(rows.model, rows["mode"])) == {
        (m, mode) for m in ("resnet20", "mobilenet_v2") for mode in ("baseline", "amp", "manual")}
    fp32 = rows[rows["mode"] == "baseline"].set_index("model").mean_ms
    assert rows.speedup_vs_fp32.tolist() == pytest.approx((rows.model.map(fp32) / rows.mean_ms).tolist())
    params = {m: count_params(build_model(m)) for m in ("resnet20", "mobilenet_v2")}
    assert rows.params.tolist() == rows.model.map(params).tolist()
    assert (rows.peak_memory_bytes >= 4 * rows.params).all()  # the process holds the FP32 weights at least
    assert rows.half_compute.isna().tolist() == (rows["mode"] == "baseline").tolist()  # FP32 has no half compute
    assert set(rows.half_compute.dropna()) == {"emulated"} and (rows.repeats == 3).all() and (rows.device == "cpu").all()
    assert rows.device_name.notna().all() and set(rows.dtype) == {"float32", "autocast float16", "float16"}
    assert (rows[rows["mode"] == "baseline"].speedup_vs_fp32 == 1.0).all()
    assert math.isclose(rows.gmacs_per_image[0], 0.040813184)
    printed = capsys.readouterr().out
    assert "±" in printed and "appended 6 rows" in printed
    assert main(["--model", "resnet20", "--mode", "manual", "--image-size", "32", "--repeats", "2", "--device", "cpu",
                 "--out", str(out), "--channels-last"]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 7 and rows.channels_last.tolist() == [False] * 6 + [True]
