"""The option registry: every RunConfig field carries its roles, flag and help, and every list of options, default
and cross-check elsewhere derives from it (no list of option names is written twice)."""

import ast
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from mixprec import config, study
from mixprec.cli import UsageError
from mixprec.config import ROLES, RunConfig, build_parser, changed, defaults, option_name, options_with
from mixprec.report import groups, tables

PACKAGE = Path(config.__file__).parent
NAMES = {f.name for f in fields(RunConfig)}
# tuples of field names that are record keys, not a role's members: config.json's keys the report needs of a run
RECORD_KEYS = {("report/runs.py", ("mode", "model", "seed"))}


def test_every_field_has_a_role_a_help_section_and_help():
    for f in fields(RunConfig):
        assert f.metadata["roles"] and f.metadata["roles"] <= set(ROLES), f.name
        assert f.metadata["group"] in config.GROUPS and len(f.metadata["help"]) > 10, f.name
    assert all(options_with(role) for role in ROLES)  # no role is left without an option


def test_the_lists_elsewhere_are_the_registrys():
    assert config.ABLATION_OPTIONS == options_with("ablation")
    assert groups.TRAINING == options_with("training") and groups.LABELLED == options_with("label")
    assert groups.IGNORED == options_with("copy") and tables.GRID == study.GRID == options_with("grid")
    assert study.VARIED == tuple(option_name(n) for n in options_with("study")) + ("--resume",)
    assert set(options_with("label")) <= set(options_with("ablation"))
    assert groups.DEFAULTS == {name: groups._hashable(value) for name, value in defaults().items()}


def _literals(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            yield node.lineno, tuple(e.value for e in node.elts if isinstance(e, ast.Constant)
                                     and isinstance(e.value, str) and e.value in NAMES)


def test_no_module_writes_a_list_of_options_of_one_role_by_hand():
    """A literal tuple, list or set of three or more option names that share a role is a copy of the registry."""
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        for line, names in _literals(ast.parse(path.read_text())):
            shared = set.intersection(*(set(f.metadata["roles"]) for f in fields(RunConfig) if f.name in names)) \
                if len(names) >= 3 else set()
            if shared and (relative, names) not in RECORD_KEYS:
                copies.append(f"{relative}:{line} {names} (role {', '.join(sorted(shared))})")
    assert not copies, copies


def _other_value(name: str):
    f = next(f for f in fields(RunConfig) if f.name == name)
    if isinstance(f.default, bool):
        return not f.default
    choices = f.metadata["argparse"].get("choices")
    if choices:
        return next(c for c in choices if c != f.default)
    return {"loss_scale": "none", "fp8_amax_history": 32, "fp8_margin": 1}[name]


@pytest.mark.parametrize("name", options_with("manual"))
def test_a_manual_option_away_from_its_default_is_refused_in_another_mode_by_its_flag(name):
    with pytest.raises(UsageError, match=f"^{option_name(name)} is an ablation of manual mode"):
        RunConfig(mode="amp", model="resnet20", **{name: _other_value(name)})
    assert changed(RunConfig(mode="manual", model="resnet20", **{name: _other_value(name)}), "manual") == (name,)


@pytest.mark.parametrize("name", options_with("fp8"))
def test_an_fp8_option_without_fp8_is_refused_by_its_flag(name):
    with pytest.raises(UsageError, match=f"^{option_name(name)} sets up FP8 training"):
        RunConfig(mode="manual", model="resnet20", **{name: _other_value(name)})


def test_the_parser_has_every_field_with_its_default_and_shows_only_real_defaults():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in fields(RunConfig):
        assert actions[f.name].option_strings == [option_name(f.name)]
        assert actions[f.name].default == (None if f.default is MISSING else f.default), f.name
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "(default: ())" not in text and "(default: 0.1)" in text


@pytest.mark.parametrize("saved, expected", [(True, "fp32"), (False, "none"), ("kahan", "kahan"), (None, "fp32")])
def test_a_config_from_before_master_weights_had_kinds_reads_as_fp32_or_none(saved, expected):
    """Runs made before --master-weights wrote master_weights true or false (--no-master-weights)."""
    old = {"mode": "manual", "model": "resnet20"} | ({} if saved is None else {"master_weights": saved})
    assert config.config_from_json(old).master_weights == expected
    assert config.upgrade(old).get("master_weights", "fp32") == expected


def test_master_weights_takes_its_four_kinds_and_the_old_flag_says_what_it_is_now(capsys):
    for kind in config.MASTER_WEIGHTS:
        cfg = config.parse_args(["--mode", "manual", "--model", "resnet20", "--master-weights", kind])
        assert cfg.master_weights == kind
    for argv, message in ((["--master-weights", "fp16"], "invalid choice: 'fp16'"),
                          (["--no-master-weights"], "--no-master-weights is now --master-weights none")):
        with pytest.raises(SystemExit) as stopped:
            config.parse_args(["--mode", "manual", "--model", "resnet20", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("model, hint", [
    ("resnet81", "did you mean resnet18? (give it as --model resnet18)"),
    ("efficientnet_b7", "did you mean efficientnet_b3 or efficientnet_b0?"),
    ("zzz", f"choose one of the {len(config.MODELS)} that --help lists"),
])
def test_a_mistyped_model_is_one_line_naming_the_closest_not_every_model(model, hint, capsys):
    with pytest.raises(SystemExit) as stopped:
        config.parse_args(["--mode", "amp", "--model", model])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and hint in err[0] and f"invalid choice: {model!r}" in err[0]
    assert "mobilenet_v2" not in err[0] and err[0].count("--help") == 1  # not argparse's list of every model
    with pytest.raises(UsageError, match=f"^unknown --model {model!r}; ") as refused:  # code builds RunConfigs too
        RunConfig(mode="amp", model=model)
    assert hint in str(refused.value)


def test_a_short_list_of_choices_is_named_in_full(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--mode", "xyz"])
    assert "invalid choice: 'xyz'; choose one of baseline, amp, manual" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_the_new_kinds_are_manual_mode_ablations_and_combine_with_bfloat16_and_fp8(kind):
    for mode in ("baseline", "amp"):
        with pytest.raises(UsageError, match="^--master-weights is an ablation of manual mode"):
            RunConfig(mode=mode, model="resnet20", master_weights=kind)
    for other in (dict(manual_dtype="bfloat16"), dict(fp8="delayed"), dict(fp8="current"), dict(fp16_batchnorm=True)):
        assert RunConfig(mode="manual", model="resnet20", master_weights=kind, **other).master_weights == kind
    with pytest.raises(UsageError, match="unknown --master-weights True"):
        RunConfig(mode="manual", model="resnet20", master_weights=True)  # the old boolean, from code
