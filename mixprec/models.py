"""Models adapted to CIFAR-10's 32x32 inputs, built from torchvision's and timm's architectures.

``build_model(name)`` looks the name up in :data:`MODELS`, a plain dict of builders. Nothing is
re-implemented: each builder takes the library's ImageNet architecture and removes or shrinks the
early downsampling that would otherwise shrink a 32x32 image to a few pixels before the network
has started (Frankola 2022 found EfficientNets stalled at ~80% on CIFAR-10 with their ImageNet
stride-2 stems, and learned once the stem stride was 1). Each adaptation is the builder's one-line
docstring; :func:`adaptations` lists them.

Where a stem keeps its kernel and only loses its stride, ``--pretrained`` ImageNet weights load into
it unchanged. The ResNets' 3x3 stem (the seed thesis's and kuangliu/pytorch-cifar's) replaces the 7x7
one, so with ``--pretrained`` it is the one freshly initialised layer besides the classifier.

``resnet20`` is He et al. 2016's CIFAR ResNet (3 stages of 3 basic blocks, 16/32/64 channels),
assembled from torchvision's ``BasicBlock``. Downsampling shortcuts are 1x1 convolutions (option B),
which adds 2,752 parameters to the paper's 0.27M. It has no ImageNet weights.
"""

from __future__ import annotations

import copy
import inspect
import logging
import socket
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .cli import UsageError

# torchvision and timm are imported inside the builders: they cost seconds, and the CLI needs only
# the names to parse its options and report a typo.


def _stride1(conv: nn.Conv2d, padding: int | None = None) -> None:
    """Turn a downsampling convolution into a full-resolution one, keeping its kernel and weights."""
    conv.stride = (1, 1)
    if padding is not None:
        conv.padding = (padding, padding)


def _torchvision(arch: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    """torchvision's ``arch``, freshly initialised, or with its ImageNet weights and a new classifier."""
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    remedy = f"put {weights.url} in {checkpoints} (TORCH_HOME)"
    try:
        if not (checkpoints / Path(urlparse(weights.url).path).name).exists():
            _check_reachable(weights.url)
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except OSError as e:  # urllib's URLError, timeouts, an unwritable TORCH_HOME
        raise _no_weights(arch, e, remedy) from None
    # the classifier is the last Linear in every torchvision CNN; ImageNet's 1000 classes become ours
    head, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    model.set_submodule(head, nn.Linear(linear.in_features, num_classes))
    return model


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    """Raise ``OSError`` at once if ``url``'s host cannot be connected to, before a library prints that it
    is downloading and then retries. Behind a proxy (``https_proxy``) the library is left to try."""
    if urllib.request.getproxies().get(urlparse(url).scheme):
        return
    parts = urlparse(url)
    socket.create_connection((parts.hostname, parts.port or {"http": 80}.get(parts.scheme, 443)), timeout).close()


def _timm_weights_source(arch: str) -> str | None:
    """Where timm would download ``arch``'s ImageNet weights from, or None if they are cached (HF_HOME)."""
    import huggingface_hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if not cfg.hf_hub_id:
        return cfg.url
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(
            isinstance(huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, f), str)
            for f in ("model.safetensors", "pytorch_model.bin")):
        return None
    return huggingface_hub.constants.ENDPOINT


def _timm(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, it logs ~20 lines of retries before it gives up
    try:
        if pretrained and (url := _timm_weights_source(arch)):
            _check_reachable(url)  # offline, timm would retry for ~50 s
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError and URLError are both OSErrors
        raise _no_weights(arch, e, "fetch it into HF_HOME on a machine with network") from None
    finally:
        hub_log.setLevel(level)


def _no_weights(arch: str, e: Exception, remedy: str) -> UsageError:
    reason = textwrap.shorten(str(e), 200, placeholder="...") or "no details"
    return UsageError(f"cannot download ImageNet weights for {arch} (no network?): {type(e).__name__}: "
                      f"{reason}; run without --pretrained or {remedy}")


def _fan_in_classifier(model: nn.Module) -> nn.Module:
    """Re-initialise the classifier (the last Linear) as nn.Linear does, uniform in +-1/sqrt(fan-in), bias 0.

    torchvision's EfficientNets and timm's TF ports draw it uniform in +-1/sqrt(fan-out), which is +-0.32 for 10
    classes: ten times ImageNet's range, logits of std ~3 and a first loss of ~5 instead of ln 10 = 2.30."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    bound = head.in_features ** -0.5
    nn.init.uniform_(head.weight, -bound, bound)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return model


def _cifar_resnet(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
        """3x3 stride-1 first convolution instead of 7x7/2, and no max-pool: stages at 32, 16, 8, 4 px."""
        model = _torchvision(arch, num_classes, pretrained)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    return build


def _efficientnet(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
        """Stem convolution stride 2 -> 1 (Frankola 2022's fix): stages at 32 down to 2 px."""
        model = _torchvision(arch, num_classes, pretrained)
        _stride1(model.features[0][0])
        return _fan_in_classifier(model)  # torchvision's is sized for 1,000 classes

    return build


def _timm_efficientnetv2(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
        """timm's TF port, as the thesis used; stem convolution stride 2 -> 1: stages at 32 down to 2 px."""
        model = _timm(arch, num_classes, pretrained)
        _stride1(model.conv_stem)  # a Conv2dSame: its TF 'same' padding follows the stride
        return _fan_in_classifier(model)  # timm's TF init is sized by the classes, as torchvision's

    return build


def alexnet(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """conv1 11x11 stride 4 -> 1 (padding 5), the max-pool after it removed: last map 7x7 (ImageNet's: 6x6)."""
    model = _torchvision("alexnet", num_classes, pretrained)
    _stride1(model.features[0], padding=5)
    del model.features[2]
    return model


def vgg16(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """First max-pool removed: the five blocks run at 32, 32, 16, 8, 4 px and end at 2x2 (not 1x1)."""
    model = _torchvision("vgg16", num_classes, pretrained)
    del model.features[4]
    return model


def googlenet(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """conv1 7x7 stride 2 -> 1 and maxpool1 removed: inception 3/4/5 at 16, 8, 4 px; no auxiliary heads."""
    kwargs = {} if pretrained else {"init_weights": True}  # init_weights=None warns and means True
    # transform_input=False: inputs are CIFAR-normalised for every model, with or without ImageNet weights
    model = _torchvision("googlenet", num_classes, pretrained, aux_logits=False, transform_input=False, **kwargs)
    _stride1(model.conv1.conv)
    model.maxpool1 = nn.Identity()
    return model


def densenet121(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """conv0 7x7 stride 2 -> 1 and pool0 removed: dense blocks at 32, 16, 8, 4 px."""
    model = _torchvision("densenet121", num_classes, pretrained)
    _stride1(model.features.conv0)
    model.features.pool0 = nn.Identity()
    return model


def mobilenet_v2(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """Stem convolution stride 2 -> 1, as the EfficientNets: stages at 32 down to 2 px."""
    model = _torchvision("mobilenet_v2", num_classes, pretrained)
    _stride1(model.features[0][0])
    return model


class ResNet20(nn.Module):
    """None needed: He et al. 2016's CIFAR ResNet-20 (section 4.2), stages at 32, 16, 8 px, 1x1 shortcuts."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], 16
        for out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                down = None
                if i == 0 and (stride != 1 or width != out):
                    down = nn.Sequential(nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(BasicBlock(width, out, stride=stride if i == 0 else 1, downsample=down))
                width = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": ResNet20,
    "resnet18": _cifar_resnet("resnet18"),
    "resnet34": _cifar_resnet("resnet34"),
    "resnet50": _cifar_resnet("resnet50"),
    "resnet152": _cifar_resnet("resnet152"),
    "efficientnet_b0": _efficientnet("efficientnet_b0"),
    "efficientnet_b3": _efficientnet("efficientnet_b3"),
    "efficientnet_v2_s": _efficientnet("efficientnet_v2_s"),
    "efficientnetv2_b0": _timm_efficientnetv2("tf_efficientnetv2_b0"),
    "efficientnetv2_b3": _timm_efficientnetv2("tf_efficientnetv2_b3"),
    "alexnet": alexnet,
    "vgg16": vgg16,
    "googlenet": googlenet,
    "densenet121": densenet121,
    "mobilenet_v2": mobilenet_v2,
}


def source(name: str) -> str:
    """Where ``name``'s architecture comes from."""
    if name == "resnet20":
        return "torchvision `BasicBlock`s"
    if name.startswith("efficientnetv2_"):
        return f"timm `tf_{name}`"
    return f"torchvision `{name}`"


def has_pretrained(name: str) -> bool:
    """Whether ``--pretrained`` can load ImageNet weights for ``name`` (every model built from a library's)."""
    return "pretrained" in inspect.signature(MODELS[name]).parameters


def adaptations() -> dict[str, str]:
    """Each model's CIFAR adaptation, in one line (its builder's docstring)."""
    return {name: (build.__doc__ or "").strip().splitlines()[0] for name, build in MODELS.items()}


def build_model(name: str, num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """A model from :data:`MODELS`, in FP32, for 32x32 inputs: freshly initialised, or with ImageNet
    weights (``pretrained``, downloaded once by torchvision or timm) and a new classifier.

    Example::

        model = build_model("resnet20")
        model(torch.randn(2, 3, 32, 32)).shape  # torch.Size([2, 10])
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if not pretrained:
        return MODELS[name](num_classes)
    if not has_pretrained(name):
        raise UsageError(f"--pretrained: there are no ImageNet weights for {name}; pick a torchvision or timm model")
    return MODELS[name](num_classes, pretrained=True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device: same structure and shapes, no data, no memory, no compute."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass of one ``image_size`` x ``image_size`` image, in eval mode.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; a MAC is
    two of its FLOPs) on a meta-device copy, so it costs nothing at any image size and leaves ``model``
    untouched.

    Example::

        count_macs(build_model("resnet18"))  # 555_422_720: 0.555 GMAC
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = meta_copy(model).eval()
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() // 2
