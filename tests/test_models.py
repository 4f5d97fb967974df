import copy
import math
import socket
import urllib.error

import pytest
import torch
from torch import nn

from mixprec.cli import UsageError
from mixprec.config import RunConfig
from mixprec.models import MODELS, adaptations, build_model, count_macs, count_params, has_pretrained
from mixprec.steps import setup_precision

# Frankola 2022's tables (timm models, 10 classes)
SEED_THESIS_PARAMS = {"resnet18": 11.18e6, "efficientnet_b3": 10.71e6, "efficientnetv2_b3": 12.84e6,
                      "efficientnet_v2_s": 20.19e6}
# forward MACs of one 32x32 image with the stride-1 CIFAR stem (kuangliu/pytorch-cifar, ANCHORS.md)
REFERENCE_MACS = {"resnet18": 0.556e9, "resnet34": 1.16e9, "resnet50": 1.30e9}
# the library architecture each model adapts; the ResNets swap the 7x7x3x64 stem for a 3x3 one
LIBRARY = {name: ("torchvision", name) for name in MODELS if name != "resnet20"}
LIBRARY.update(efficientnetv2_b0=("timm", "tf_efficientnetv2_b0"), efficientnetv2_b3=("timm", "tf_efficientnetv2_b3"))
STEM_PARAMS_REMOVED = {name: 64 * 3 * (7 * 7 - 3 * 3) for name in ("resnet18", "resnet34", "resnet50", "resnet152")}
# the smallest map a 3x3 (or larger) convolution produces, as each builder's docstring says; 2 if not listed
LAST_CONV_MAP = {"resnet20": 8, "resnet18": 4, "resnet34": 4, "resnet50": 4, "resnet152": 4, "alexnet": 15, "vgg16": 4,
                 "googlenet": 4, "densenet121": 4}
# 57M-134M parameters: 10-20 s a model for the three modes on one CPU core, most of it in bfloat16 autocast,
# which has no fast CPU kernels here
LARGEST = {"vgg16", "resnet152", "alexnet"}


def _on_meta(build):
    with torch.device("meta"):  # shapes only: no initialisation, no memory
        return build()


@pytest.mark.parametrize("name", SEED_THESIS_PARAMS)
def test_parameter_counts_match_the_seed_thesis_within_1_percent(name):
    assert count_params(_on_meta(lambda: build_model(name))) == pytest.approx(SEED_THESIS_PARAMS[name], rel=0.01)


def test_resnet20_has_the_papers_size_plus_its_projection_shortcuts():
    assert count_params(build_model("resnet20")) == 272_474  # He et al.'s 0.27M + 2,752 in the 1x1 shortcuts


@pytest.mark.parametrize("name", LIBRARY)
def test_the_cifar_adaptation_keeps_the_library_architecture(name):
    library, arch = LIBRARY[name]
    if library == "timm":
        import timm

        original = _on_meta(lambda: timm.create_model(arch, num_classes=10))
    else:
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
        original = _on_meta(lambda: torchvision.models.get_model(arch, num_classes=10, **kwargs))
    model = _on_meta(lambda: build_model(name))
    assert count_params(model) == count_params(original) - STEM_PARAMS_REMOVED.get(name, 0)
    assert adaptations()[name] and has_pretrained(name)


@pytest.mark.parametrize("name", MODELS)
def test_the_last_convolutions_still_see_more_than_one_pixel(name):
    """With ImageNet's stems (total stride 32), every one of these would run its last 3x3 convolutions on 1x1 maps."""
    model = _on_meta(lambda: build_model(name)).eval()
    sizes = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            m.register_forward_hook(lambda m, args, out: sizes.append(out.shape[-1]))
    model(torch.empty(1, 3, 32, 32, device="meta"))
    assert min(sizes) == LAST_CONV_MAP.get(name, 2)


def test_cifar_stem_keeps_full_resolution():
    model = _on_meta(lambda: build_model("resnet18"))
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)
    for name in ("efficientnet_b3", "efficientnetv2_b3", "mobilenet_v2"):
        model = _on_meta(lambda name=name: build_model(name))
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert stem.stride == (1, 1), name


@pytest.mark.parametrize("name", REFERENCE_MACS)
def test_macs_match_the_reference_counts(name):
    assert count_macs(_on_meta(lambda: build_model(name))) == pytest.approx(REFERENCE_MACS[name], rel=0.01)


def test_macs_are_counted_on_a_copy_and_scale_with_the_image_area():
    model = build_model("resnet20")
    before = copy.deepcopy(model.state_dict())
    macs = count_macs(model)
    # by hand: 3x3 stem 442,368 + stages 14,155,776 + 12,976,128 + 12,976,128 + 1x1 shortcuts 2 x 131,072
    # + classifier 640
    assert macs == 40_813_184
    assert count_macs(model, image_size=64) == pytest.approx(4 * macs, rel=0.001)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_unknown_model_names_the_choices():
    with pytest.raises(KeyError, match="resnet20"):
        build_model("vgg99")


def _forward_backward(model: nn.Module, name: str, mode: str):
    """One step of the mode's own training step on 2 images; returns what it produced."""
    # plain SGD: no momentum buffers for 134M parameters; what is under test is the mode's forward and backward
    cfg = RunConfig(mode=mode, model=name, device="cpu", momentum=0.0, weight_decay=0.0)
    precision = setup_precision(cfg, model, torch.device("cpu"))
    model.train()
    torch.manual_seed(0)
    scale = precision.loss_scale()
    out = precision.step(torch.randn(2, 3, 32, 32), torch.tensor([3, 7]))
    return precision, scale, out


def _check_step(model: nn.Module, name: str, mode: str):
    precision, scale, out = _forward_backward(model, name, mode)
    assert out.logits.shape == (2, 10) and torch.isfinite(out.logits.float()).all(), (name, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in params), "backward missed a parameter"
    if mode == "manual":
        assert {p.dtype for p in params} >= {torch.float16}
        assert all(p.dtype == torch.float32 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters())
    if mode == "baseline":
        assert not out.skipped and torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in params)
    # at init on 2 images some FP16 gradients overflow the 2^16 loss scale: the scaler (GradScaler in amp, ours in
    # manual) skips and backs off
    elif out.skipped:
        assert precision.loss_scale() == scale / 2
    else:
        assert precision.loss_scale() == scale
        assert all(torch.isfinite(p.grad).all() for p in (precision.master.params if precision.master else params))


@pytest.fixture(scope="module")
def fp32_models():
    """Each model built once for the module; every mode steps a deep copy of it."""
    cache = {}
    yield lambda name: copy.deepcopy(cache.setdefault(name, build_model(name)))
    cache.clear()


@pytest.mark.parametrize("name", MODELS)
def test_a_fresh_model_starts_near_a_uniform_guess(name, fp32_models):
    """Before any update, the loss on random images is about ln 10, a uniform guess over the 10 classes: no
    classifier initialised for ImageNet's 1,000 (the EfficientNets' were: a first loss of 3.8-5.5)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model = fp32_models(name) if name not in LARGEST else build_model(name)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.train()(x), y).item()
    assert abs(loss - math.log(10)) < 0.4, loss


@pytest.mark.parametrize("mode", ["baseline", "amp", "manual"])
@pytest.mark.parametrize("name", [n for n in MODELS if n not in LARGEST])
def test_every_model_trains_a_step_in_every_mode(name, mode, fp32_models):
    _check_step(fp32_models(name), name, mode)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGEST))
def test_the_largest_models_train_a_step_in_every_mode(name):
    model = build_model(name)
    for mode in ("baseline", "amp", "manual"):
        _check_step(copy.deepcopy(model) if mode != "manual" else model, name, mode)


def test_channels_last_model_steps_in_every_mode():
    for mode in ("baseline", "amp", "manual"):
        model = build_model("mobilenet_v2").to(memory_format=torch.channels_last)
        assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        _check_step(model, "mobilenet_v2", mode)


def test_pretrained_loads_the_cached_torchvision_weights_with_a_new_classifier(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT
    imagenet = torchvision.models.mobilenet_v2()  # stands in for the download, which a test must not do
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    model = build_model("mobilenet_v2", pretrained=True)
    assert torch.equal(model.features[0][0].weight, imagenet.features[0][0].weight)  # the stem keeps its kernel
    assert model.features[0][0].stride == (1, 1)
    assert model.classifier[1].out_features == 10


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _no_dns(*args, **kwargs):
    raise socket.gaierror(-3, "Temporary failure in name resolution")


class _Connected:
    def close(self):
        pass


def _must_not_download(*args, **kwargs):
    raise AssertionError("downloaded although the host is unreachable")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def test_pretrained_without_network_fails_in_one_line_before_downloading(empty_caches, monkeypatch, capsys):
    import timm.models._hub

    monkeypatch.setattr(socket, "create_connection", _no_dns)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _must_not_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", _must_not_download)
    for name, arch in (("resnet18", "resnet18"), ("efficientnetv2_b0", "tf_efficientnetv2_b0")):
        with pytest.raises(UsageError) as e:
            build_model(name, pretrained=True)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"cannot download ImageNet weights for {arch} (no network?)")
        assert "gaierror: [Errno -3] Temporary failure in name resolution" in message
        assert "run without --pretrained" in message
    assert capsys.readouterr().err == ""  # no "Downloading: ..." line before the error


def test_pretrained_download_failing_after_the_host_answered_is_a_one_line_usage_error(empty_caches, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: _Connected())
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(UsageError) as e:
        build_model("resnet18", pretrained=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot download ImageNet weights for resnet18 (no network?)")
    assert "Temporary failure in name resolution" in message and "run without --pretrained" in message


def test_pretrained_timm_model_failing_after_the_host_answered_is_a_one_line_usage_error(empty_caches, monkeypatch):
    import timm.models._hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.\nTo enable hf.co look-ups, set HF_HUB_OFFLINE=0.")

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: _Connected())
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    with pytest.raises(UsageError, match=r"^cannot download ImageNet weights for tf_efficientnetv2_b0 \(no network"
                                         r"\?\): LocalEntryNotFoundError: [^\n]*$"):
        build_model("efficientnetv2_b0", pretrained=True)


def test_pretrained_needs_a_library_model():
    assert not has_pretrained("resnet20")
    with pytest.raises(UsageError, match="no ImageNet weights for resnet20"):
        RunConfig(mode="baseline", model="resnet20", pretrained=True)
