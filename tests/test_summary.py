import pytest
import torch

from mixprec.models import build_model, count_macs, count_params
from mixprec.summary import OUTSIDE, layer_table, main


@pytest.mark.parametrize("name,depth", [("resnet20", 1), ("resnet18", 3), ("efficientnetv2_b0", 2),
                                        ("googlenet", 2), ("densenet121", 2)])
def test_layer_rows_add_up_to_the_model_totals(name, depth):
    with torch.device("meta"):
        model = build_model(name)
    table = layer_table(model, depth=depth)
    assert table.params.sum() == count_params(model)
    assert table.macs.sum() == count_macs(model)
    assert table.layer.is_unique
    layers = table[table.layer != OUTSIDE]  # each row holds its own module's parameters
    assert layers.params.tolist() == [count_params(model.get_submodule(name)) for name in layers.layer]


def test_rows_follow_the_forward_pass_with_output_shapes():
    table = layer_table(build_model("resnet20"), depth=1)
    assert table.layer.tolist() == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    shapes = dict(zip(table.layer, table.output_shape))
    assert shapes["layer1"] == "1 x 16 x 32 x 32" and shapes["layer3"] == "1 x 64 x 8 x 8" and shapes["fc"] == "1 x 10"
    macs = dict(zip(table.layer, table.macs))
    assert macs["conv1"] == 3 * 16 * 9 * 32 * 32 and macs["fc"] == 64 * 10 and macs["relu"] == 0
    assert OUTSIDE not in shapes


def test_cli_prints_the_table_with_totals(capsys):
    assert main(["--model", "resnet18", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "output shape" in out and "layer4" in out and "1 x 512 x 4 x 4" in out
    assert "total: 11,173,962 parameters, 0.5554 GMACs" in out


def test_cli_rejects_an_image_too_small_in_one_line(capsys):
    assert main(["--model", "vgg16", "--image-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vgg16 cannot take a 4x4 image" in err[0]


def test_model_list_is_the_readme_table(capsys):
    from mixprec.models import MODELS

    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(MODELS) + 2 and lines[0].startswith("| `--model` |")
    assert any(line.startswith("| `resnet18` | torchvision `resnet18` |") and "| 11.17M | 0.555 |" in line
               for line in lines)
