"""What only a CUDA GPU can check: the native FP16 paths that are the default there. Marked ``cuda`` and skipped
without a GPU; ``experiments/gpu_check.sh`` runs them (``pytest -m cuda``) on the day a GPU is at hand."""

import pytest
import torch

from mixprec.config import RunConfig
from mixprec.models import build_model
from mixprec.steps import setup_precision

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (experiments/gpu_check.sh)")]


@pytest.fixture
def gpu():
    return torch.device("cuda")


def test_native_fp16_kernels_agree_with_the_emulation_per_layer_type(gpu):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    from half_agreement import agreement

    for row in agreement(gpu):
        assert max(row["output"], row["input_grad"], row["weight_grad"]) <= 8.0, row


@pytest.mark.parametrize("mode", ["baseline", "amp", "manual"])
def test_each_mode_trains_resnet18_on_the_gpu_with_its_cuda_defaults(gpu, mode):
    torch.manual_seed(0)
    model = build_model("resnet18").to(gpu)
    p = setup_precision(RunConfig(mode=mode, model="resnet18", device="cuda"), model, gpu)
    if mode != "baseline":
        assert p.half_compute == "native"  # tensor cores, not the emulation
    if mode == "amp":
        assert p.amp_dtype == "float16" and p.loss_scale() == 2.0**16
    x, y = torch.randn(32, 3, 32, 32, device=gpu), torch.randint(0, 10, (32,), device=gpu)
    losses = [p.step(x, y).loss.item() for _ in range(5)]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]  # the same batch: it fits


def test_peak_memory_is_the_cuda_allocators(gpu):
    from mixprec import device as dev

    dev.reset_peak_memory(gpu)
    x = torch.empty(2**20, device=gpu)  # 4 MiB
    assert dev.peak_memory_bytes(gpu) >= x.numel() * 4
