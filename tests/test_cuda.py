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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_on_the_gpu_is_unbiased_and_reproducible_from_its_seed(gpu, dtype):
    from mixprec.master import stochastic_round

    x = torch.full((1_000_000,), 1 + 2**-12, device=gpu)
    one, again = (stochastic_round(x, dtype, torch.Generator(device=gpu).manual_seed(0)) for _ in range(2))
    assert torch.equal(one, again) and one.device.type == "cuda"
    lo, hi = 1.0, torch.nextafter(torch.ones((), dtype=dtype), torch.tensor(2.0, dtype=dtype)).item()
    p = (x[0].item() - lo) / (hi - lo)
    assert abs(one.double().mean().item() - x[0].item()) < 5 * (hi - lo) * (p * (1 - p) / x.numel()) ** 0.5


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_and_kahan_train_resnet18_on_the_gpu(gpu, kind, dtype):
    """Native half kernels, the rounding on the GPU (its generator there too): the same batch is fitted."""
    torch.manual_seed(0)
    model = build_model("resnet18").to(gpu)
    p = setup_precision(RunConfig(mode="manual", model="resnet18", device="cuda", master_weights=kind,
                                  manual_dtype=dtype), model, gpu)
    assert p.half_compute == "native" and all(t.is_cuda for t in p.master.params)
    if kind == "stochastic":
        assert p.master.generator.device.type == "cuda"
    x, y = torch.randn(32, 3, 32, 32, device=gpu), torch.randint(0, 10, (32,), device=gpu)
    losses = [p.step(x, y).loss.item() for _ in range(5)]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    assert len(p.master.state_dict()) == 1  # the generator's state, or the compensation buffers
