import pytest
import torch

from mixprec.models import MODELS, build_model, count_params

# resnet18: the EfficientNet thesis's table (11.18M); resnet20: He et al. 2016 (0.27M, with option-B shortcuts)
PARAMS = {"resnet20": 0.2725e6, "resnet18": 11.18e6, "resnet34": 21.28e6, "resnet50": 23.52e6}


@pytest.mark.parametrize("name", MODELS)
def test_model_takes_32x32_and_has_the_expected_size(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert abs(count_params(model) - PARAMS[name]) / PARAMS[name] < 0.01
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_stem_keeps_full_resolution():
    model = build_model("resnet18")
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_unknown_model_names_the_choices():
    with pytest.raises(KeyError, match="resnet20"):
        build_model("vgg99")
