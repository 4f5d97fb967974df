"""Run configuration: the frozen :class:`RunConfig`, its command line, and its validation.

Everything a run varies is one field here, and ``config.json`` is ``asdict(cfg)``. Each field is also the
one record of its option: its flag, its help, its place in ``--help`` and its roles (:data:`ROLES`), in the
field's metadata (:func:`option`). Every list of options elsewhere (the ablation record, the study's
varied options and labels, the report's training settings and mode labels) is :func:`options_with` a role,
and every cross-check reads the defaults off the fields, so a new option is one field.

Options that depend on the device (``--device auto``, ``--amp-dtype auto``, ``--half-compute auto``) stay as
given in the config; the resolved values are recorded next to them in ``summary.json`` by the trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path

from .cli import OneLineParser, UsageError, did_you_mean
from .models import MODELS, has_pretrained

MODES = ("baseline", "amp", "manual")
SCHEDULES = ("step", "cosine", "cosine-restarts")
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("auto", "float16", "bfloat16")
HALF_COMPUTES = ("auto", "native", "emulated")
MANUAL_DTYPES = ("float16", "bfloat16")
MASTER_WEIGHTS = ("fp32", "none", "stochastic", "kahan")  # how manual mode's updates reach its half weights (master.py)
FP8_RECIPES = ("off", "delayed", "current")
ON_MIN_SCALE = ("raise", "skip")
EXTENDABLE_SCHEDULES = ("step", "cosine-restarts")  # lr schedules that do not depend on --epochs
# (train.make_scheduler): --resume --epochs may extend a run of these, and the run's lr is exactly a longer run's

ROLES = {  # what an option is to the rest of mixprec; every field has at least one
    "study": "set per combination by python -m mixprec.study (its --models, --modes, --seeds, --lr, ... lists)",
    "grid": "python -m mixprec.study takes several values and trains every combination (a hyperparameter grid)",
    "training": "a training setting: the report compares a mode with the baseline that matches it in all of them",
    "copy": "differs between seeds or copies of one setting: the report pools runs over it",
    "precision": "how amp's and manual's arithmetic runs (resolved for the device in summary.json)",
    "ablation": "a manual-mode ablation or scaler control: summary.json's ablation entry, and a study's run label "
                "when not at its default",
    "label": "named in the report's mode label when not at its default",
    "manual": "means something in manual mode only: given with another mode, an error",
    "fp8": "sets up FP8 training: given without --fp8 delayed or current, an error",
    "fault": "fault injection, to watch a loss scaler skip a step",
    "resumable": "--resume lets it differ from the run's own",
}
GROUPS = {  # sections of --help, in order
    "run": None,
    "training": "training recipe",
    "precision": "precision and device",
    "data": "data and output",
    "ablations": "manual-mode ablations and loss-scaler controls",
    "fp8": "FP8, a recipe over manual mode's FP16 model",
}
CHECKS = {  # value checks an option can ask for: (test, what the error says it must be)
    "positive int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "non-negative int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                         "a non-negative integer"),
    "positive number": (lambda v: _number(v) and v > 0, "a positive number"),
    "non-negative number": (lambda v: _number(v) and v >= 0, "a non-negative number"),
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _step_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step numbers like 3,10,25, got {text!r}") from None


def option(default=MISSING, *, roles: str, group: str, help: str, flag: str | None = None, check: str | None = None,
           **argparse_kwargs) -> Field:
    """A :class:`RunConfig` field and its option: ``roles`` (names from :data:`ROLES`, space-separated), its
    ``--help`` section (:data:`GROUPS`), its help, its flag (default ``--field-name``), a value ``check`` from
    :data:`CHECKS` (None values pass), and what else argparse needs (``choices``, ``type``, ``metavar``). A bool
    field is a switch: its flag turns a False default on, and a True default's flag (``--no-...``) turns it off."""
    unknown = set(roles.split()) - set(ROLES)
    assert not unknown and group in GROUPS and (check is None or check in CHECKS), (roles, group, check)
    return field(default=default, metadata={"roles": frozenset(roles.split()), "group": group, "help": help,
                                            "flag": flag, "check": check, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults follow the seed thesis (Oreč 2021): SGD, lr 0.1,
    momentum 0.9, batch 128, lr halved every 20 epochs, 50 epochs."""

    mode: str = option(roles="study", group="run", choices=MODES,
                       help="baseline: FP32. amp: torch.autocast + torch.amp.GradScaler. manual: FP16 model, FP32 "
                       "BatchNorm, FP32 master weights, dynamic loss scaler. Required (unless --resume)")
    model: str = option("resnet18", roles="study", group="run", choices=MODELS,  # the live dict: tests add models
                        help="architecture, adapted to 32x32 inputs (resnet20 is the one that trains in minutes on "
                        "a CPU)")
    pretrained: bool = option(False, roles="training", group="run",
                              help="start from torchvision's or timm's ImageNet weights (downloaded once into "
                              "TORCH_HOME or HF_HOME), with a new classifier; layers the CIFAR adaptation replaced "
                              "start fresh")
    channels_last: bool = option(False, roles="training", group="run",
                                 help="keep the model's weights and the input batches in channels_last (NHWC) "
                                 "memory format, which tensor cores prefer")
    epochs: int = option(50, roles="training", group="training", check="positive int", help="training epochs")
    batch_size: int = option(128, roles="training", group="training", check="positive int",
                             help="training batch size; when you change it, scale --lr with it (linear scaling "
                             "rule, Goyal et al. 2017: batch 256 with lr 0.2 trains like batch 128 with lr 0.1, in "
                             "half the steps)")
    lr: float = option(0.1, roles="study grid training", group="training", check="positive number",
                       help="SGD learning rate (the peak one, after any warm-up)")
    momentum: float = option(0.9, roles="study grid training", group="training", check="non-negative number",
                             help="SGD momentum")
    weight_decay: float = option(5e-4, roles="study grid training", group="training", check="non-negative number",
                                 help="SGD weight decay")
    schedule: str = option("step", roles="training", group="training", choices=SCHEDULES,
                           help="step: lr halved every 20 epochs (seed thesis); cosine: cosine annealing to 0 over "
                           "the run; cosine-restarts: cosine annealing with warm restarts every 10, 20, 40... epochs "
                           "(EfficientNet thesis)")
    warmup_epochs: float = option(0.0, roles="training", group="training", metavar="F",
                                  help="with --schedule cosine: raise the lr linearly from lr/10 to --lr over the "
                                  "first F epochs (fractions allowed, counted in optimizer steps), then anneal it to "
                                  "0 over the rest of the run; large peak lrs need this")
    label_smoothing: float = option(0.0, roles="training", group="training", metavar="X",
                                    help="train against targets smoothed by X (F.cross_entropy's label_smoothing): "
                                    "1-X on the label, X/10 spread over all classes; the training loss includes it, "
                                    "evaluation does not")
    nesterov: bool = option(False, roles="training", group="training",
                            help="SGD with Nesterov momentum (needs --momentum > 0)")
    crop_padding: int = option(4, roles="training", group="training", check="non-negative int", metavar="N",
                               help="training augmentation: zero-pad each image by N pixels and crop a random 32x32 "
                               "window (0: flips only); a lighter augmentation fits faster in a short run")
    test_time_flip: bool = option(False, roles="training", group="training",
                                  help="evaluate (validation and test) on the mean of the logits of each image and "
                                  "of its horizontal mirror image, as airbench does; training is unchanged")
    seed: int = option(0, roles="study copy", group="training", check="non-negative int",
                       help="seed for initial weights, batch order and augmentation")
    device: str = option("auto", roles="precision copy", group="precision", choices=DEVICES,
                         help="auto: cuda if available, else cpu")
    amp_dtype: str = option("auto", roles="precision", group="precision", choices=AMP_DTYPES,
                            help="autocast dtype in amp mode. auto: float16 on every device, with "
                            "torch.amp.GradScaler (PyTorch's FP16 recipe, the reference for manual mode). bfloat16: "
                            "autocast without a loss scaler, a variant that is faster than FP32 only on CPUs with "
                            "bf16 units (AVX-512-BF16, AMX) and --half-compute native.")
    half_compute: str = option("auto", roles="precision", group="precision", choices=HALF_COMPUTES,
                               help="how the half-precision convolutions, linears and matmuls of amp and manual mode "
                               "run. native: PyTorch's own half kernels (on a CPU, FP16 ones are 25-200x slower than "
                               "FP32). emulated: half operands, FP32 accumulation, half results and saved tensors, "
                               "as tensor cores do, computed with FP32 kernels. auto: native on CUDA, emulated on "
                               "CPU.")
    data: str | None = option(None, roles="copy resumable", group="data", type=str,
                              help="CIFAR-10: a directory holding cifar-10-batches-py/, or an image-folder tree "
                              "train/<class>/*, test/<class>/* (or a .tar/.tar.gz of one). Default: $MIXPREC_DATA, "
                              "else ~/.cache/mixprec/cifar10, downloaded there by torchvision if absent.")
    subset: int | None = option(None, roles="training", group="data", check="positive int", type=int,
                                help="train on only N images of the 45,000-image training split, stratified by "
                                "class")
    test_subset: int | None = option(None, roles="training", group="data", check="positive int", type=int,
                                     help="evaluate on stratified subsets of N images of the test set and at most N "
                                     "of the 5,000-image validation split (quick runs only; recorded in the summary)")
    out: str = option("results", roles="copy", group="data",
                      help="results directory; the run goes to OUT/runs/<name>/")
    log_every: int | None = option(None, roles="copy resumable", group="data", check="positive int", type=int,
                                   metavar="N",
                                   help="besides each epoch's line, log a progress line every N optimizer steps: "
                                   "step, epoch, mean loss of the last N steps, lr, loss scale, images/s of the epoch "
                                   "so far (each line waits for the device once); default: off")
    tensorboard: bool = option(False, roles="copy resumable", group="data",
                               help="also write TensorBoard scalars to RUN_DIR/tensorboard/ after every epoch: each "
                               "optimizer step's loss, lr, loss scale and skip, each epoch's losses and accuracies, "
                               "and the test result (needs pip install 'mixprec[tensorboard]')")
    # ablations and scaler controls (manual mode unless noted)
    loss_scale: str = option("dynamic", roles="ablation label manual", group="ablations",
                             help="dynamic: start at 2^16, halve on overflow, double after 2000 clean steps; none: "
                             "no scaling (scale 1); a number: that static scale. Overflowing steps are skipped in "
                             "every case.")
    on_min_scale: str = option("raise", roles="ablation label manual", group="ablations", choices=ON_MIN_SCALE,
                               help="when a backoff would take the dynamic scale below 1: raise ends the run as "
                               "failed, skip holds the scale at 1 and keeps skipping overflowing steps")
    master_weights: str = option("fp32", roles="ablation label manual", group="ablations", choices=MASTER_WEIGHTS,
                                 help="how the optimizer's updates reach the half-precision weights. fp32: FP32 "
                                 "master weights, which the optimizer updates and which are rounded to nearest into "
                                 "the model after every step (4 bytes per parameter). none: the optimizer updates the "
                                 "half weights in place, so an update below half their spacing vanishes (1 + 1e-4 == "
                                 "1 in FP16). stochastic: the optimizer updates FP32 working copies of the half "
                                 "weights, and each new weight is rounded stochastically into the model (unbiased; "
                                 "random bits from a generator seeded by --seed). kahan: the same, rounded to nearest, "
                                 "with each weight's rounding error carried to the next step in a half-precision "
                                 "compensation buffer (2 bytes per parameter). With stochastic and kahan the momentum "
                                 "stays FP32, as with fp32; with none it is half")
    fp16_batchnorm: bool = option(False, roles="ablation label manual", group="ablations",
                                  help="run BatchNorm in FP16 too")
    manual_dtype: str = option("float16", roles="ablation label manual", group="ablations", choices=MANUAL_DTYPES,
                               help="the half type of manual mode; bfloat16 has FP32's exponent range and needs no "
                               "loss scaling (for FP8 see --fp8)")
    inject_overflow: tuple[int, ...] = option((), roles="ablation label fault", group="ablations", type=_step_list,
                                              metavar="STEP[,STEP...]",
                                              help="make the scaled loss inf at these optimizer steps (1-based, "
                                              "counting skipped ones), to watch a skip: manual mode, or amp with "
                                              "float16")
    inject_overflow_rank: int | None = option(None, roles="fault", group="ablations", type=int, metavar="RANK",
                                              help="under torchrun, inject the overflow on this rank only (default: "
                                              "every rank); the others must skip the step too")
    clip_grad_norm: float | None = option(None, roles="ablation training", group="ablations", type=float,
                                          metavar="X",
                                          help="clip the gradient norm to X; with a loss scaler, the unscaled "
                                          "gradients are clipped")
    accumulate: int = option(1, roles="ablation training", group="ablations", check="positive int", metavar="N",
                             help="split each batch into N micro-batches whose gradients add up to one optimizer step "
                             "(one overflow decision per step); --batch-size stays the images per optimizer step")
    telemetry_every: int = option(10, roles="ablation", group="ablations", check="positive int", metavar="N",
                                  help="measure the largest gradient and the zero and FP16-underflow fractions (and "
                                  "with --fp8 the FP8 saturation, flush-to-zero and scales) every N optimizer steps "
                                  "in manual mode (steps.csv); the loss scale and skips are recorded at every step")
    layer_stats_every: int | None = option(None, roles="copy", group="ablations", check="positive int", type=int,
                                           metavar="N",
                                           help="every N optimizer steps, in any mode, measure each Conv2d, Linear and "
                                           "BatchNorm layer's output and weight gradients: the fractions zero as "
                                           "computed and zero or subnormal in FP16 without the loss scale, the "
                                           "largest magnitude and its headroom to 65504 (layer_grads.csv; "
                                           "docs/runs.md); default: off")
    # FP8: a recipe over the FP16 model of manual mode
    fp8: str = option("off", roles="ablation label manual", group="fp8", choices=FP8_RECIPES,
                      help="train manual mode's FP16 model with its convolutions and linears on emulated FP8 "
                      "operands (E4M3 activations and weights, E5M2 gradients, per-tensor scales, FP32 "
                      "accumulation, FP16 results). delayed: each tensor's scale comes from the largest amax of its "
                      "last --fp8-amax-history uses (TransformerEngine's DelayedScaling; the first use scales from "
                      "its own amax); current: from the tensor's own amax")
    fp8_amax_history: int = option(16, roles="ablation fp8", group="fp8", check="positive int", metavar="N",
                                   help="uses of each tensor whose amax delayed scaling remembers")
    fp8_margin: int = option(0, roles="ablation fp8", group="fp8", check="non-negative int", metavar="M",
                             help="headroom: scale = format max / (amax * 2^M)")
    fp8_all_layers: bool = option(False, roles="ablation fp8", group="fp8",
                                  help="quantize the first convolution and the classifier too (by default they stay "
                                  "FP16, as in the FP8 paper)")
    deterministic: bool = option(False, roles="training", group="run",
                                 help="use PyTorch's deterministic algorithms (slower on CUDA); on a CPU a resumed run "
                                 "then ends bit-identical to an uninterrupted one")
    tf32: bool = option(True, roles="training", group="precision", flag="--no-tf32",
                        help="on Ampere and newer GPUs, turn off TF32, which PyTorch uses for FP32 convolutions by "
                        "default, so that baseline is true FP32 (summary.json records whether TF32 was on)")
    compile: bool = option(False, roles="training", group="run",
                           help="torch.compile the model (the first steps then include compilation; images_per_s "
                           "leaves out the first epoch's first steps: up to 20, summary.json's warmup_steps)")

    def __post_init__(self):
        """The one place where option values are checked, for the command line and for code alike."""
        for f in fields(self):
            value, allowed = getattr(self, f.name), f.metadata["argparse"].get("choices")
            if allowed is not None and value not in allowed:
                flag = option_name(f.name)
                raise UsageError(f"unknown {flag} {value!r}; {did_you_mean(value, allowed, flag)}")
            check = f.metadata["check"]
            if check is not None and value is not None and not CHECKS[check][0](value):
                raise UsageError(f"{option_name(f.name)} must be {CHECKS[check][1]}, got {value!r}")
        if self.pretrained and not has_pretrained(self.model):
            raise UsageError(f"--pretrained: there are no ImageNet weights for {self.model}; pick a model built from "
                             "torchvision or timm")
        if self.nesterov and self.momentum == 0:
            raise UsageError("--nesterov needs momentum: give --momentum a positive value (e.g. 0.9)")
        if not _number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not _number(self.warmup_epochs) or not 0 <= self.warmup_epochs < self.epochs:
            raise UsageError(f"--warmup-epochs must be at least 0 and less than --epochs {self.epochs}, "
                             f"got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.schedule != "cosine":
            raise UsageError(f"--warmup-epochs warms up the cosine schedule; add --schedule cosine "
                             f"(not {self.schedule})")
        if self.clip_grad_norm is not None and (not math.isfinite(self.clip_grad_norm) or self.clip_grad_norm <= 0):
            raise UsageError(f"--clip-grad-norm must be a positive number, got {self.clip_grad_norm!r}")
        if self.loss_scale not in ("dynamic", "none"):
            try:
                static = float(self.loss_scale)
            except ValueError:
                static = math.nan
            if not (math.isfinite(static) and static > 0):
                raise UsageError(f"--loss-scale must be dynamic, none or a positive number, got {self.loss_scale!r}")
        if self.batch_size % self.accumulate:
            raise UsageError(f"--batch-size {self.batch_size} does not split into --accumulate {self.accumulate} "
                             "equal micro-batches; pick a divisor")
        for name in changed(self, "manual"):
            if self.mode != "manual":
                raise UsageError(f"{option_name(name)} is an ablation of manual mode; use it with --mode manual")
        for name in changed(self, "fp8"):
            if self.fp8 == "off":
                raise UsageError(f"{option_name(name)} sets up FP8 training; use it with --mode manual --fp8 delayed "
                                 "(or current)")
        if self.fp8 == "current" and "fp8_amax_history" in changed(self, "fp8"):
            raise UsageError("--fp8-amax-history is the history of delayed scaling; --fp8 current keeps none")
        if self.fp8 != "off" and self.manual_dtype != "float16":
            raise UsageError(f"--fp8 is a recipe over an FP16 model; drop --manual-dtype {self.manual_dtype}")
        if self.fp8 != "off" and self.half_compute == "native":
            raise UsageError("--fp8 is emulated FP8 (there are no FP8 kernels here); drop --half-compute native")
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.inject_overflow):
            raise UsageError(f"--inject-overflow takes optimizer steps counted from 1, got {self.inject_overflow!r}")
        if self.inject_overflow and self.mode == "baseline":
            raise UsageError("--inject-overflow needs a loss scaler to skip the step: use --mode manual, "
                             "or amp with float16")
        if self.inject_overflow and self.mode == "amp" and self.amp_dtype == "bfloat16":
            raise UsageError("--inject-overflow in amp mode needs a GradScaler, which only float16 uses: "
                             "drop --amp-dtype bfloat16, or use --mode manual")
        if self.layer_stats_every is not None and self.compile:
            raise UsageError("--layer-stats-every hooks every layer, which --compile's graphs do not run; drop one")
        if self.inject_overflow_rank is not None and (not self.inject_overflow or self.inject_overflow_rank < 0):
            raise UsageError("--inject-overflow-rank takes a rank (0, 1, ...) and needs --inject-overflow")


def options_with(role: str) -> tuple[str, ...]:
    """The :class:`RunConfig` fields that have ``role`` (:data:`ROLES`), in field order."""
    assert role in ROLES, role
    return tuple(f.name for f in fields(RunConfig) if role in f.metadata["roles"])


def defaults() -> dict:
    """Every :class:`RunConfig` field's default (``mode`` has none)."""
    return {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}


def changed(cfg: RunConfig, role: str) -> tuple[str, ...]:
    """The options with ``role`` that ``cfg`` sets away from their defaults."""
    default = defaults()
    return tuple(name for name in options_with(role) if getattr(cfg, name) != default[name])


REPLACED_FLAGS = {"--no-master-weights": "--master-weights none"}  # older command lines, and what they say now
ABLATION_OPTIONS = options_with("ablation")  # summary.json's ablation entry; a study labels runs by those changed
RESUME_MAY_CHANGE = options_with("resumable")  # options that --resume lets differ from the run's own


def warn_if_slow(half_compute: str, dtype: str, device_type: str) -> None:
    """The check that needs the device resolved (``--device auto``): a choice that is valid but slow warns."""
    if half_compute == "native" and device_type == "cpu" and dtype == "float16":
        warnings.warn("--half-compute native on a CPU runs PyTorch's naive FP16 kernels (measured here: 25-200x "
                      "slower than FP32 for resnet20); use --half-compute emulated (the CPU default)", stacklevel=4)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, where they say something: not for switches (a switch is off until given),
    nor for options without a default."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.default in (
                None, (), argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def add_option(p, name: str) -> None:
    """The command-line option of :class:`RunConfig` field ``name``, as its metadata (:func:`option`) says."""
    f = next(f for f in fields(RunConfig) if f.name == name)
    kwargs = dict(f.metadata["argparse"])
    if isinstance(f.default, bool):
        kwargs["action"] = "store_false" if f.default else "store_true"
    elif "choices" not in kwargs and "type" not in kwargs and f.default is not MISSING:
        kwargs["type"] = type(f.default)
    p.add_argument(option_name(name), dest=name, default=None if f.default is MISSING else f.default,
                   help=f.metadata["help"], **kwargs)


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device``, for every command that trains or times a model."""
    add_option(p, "device")


def add_precision_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--amp-dtype`` and ``--half-compute``, for ``mixprec.run`` and ``mixprec.bench_infer``
    alike (``--manual-dtype``, which only ``mixprec.run`` takes, is with its ablations)."""
    for name in options_with("precision"):
        add_option(p, name)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m mixprec.run",
        description="Train one CNN on CIFAR-10 in one precision mode and write a run directory: config.json, "
        "env.json and train.log at the start; epochs.csv, steps.csv, checkpoint.pt and best.pt after every epoch "
        "(with --layer-stats-every, layer_grads.csv; with --tensorboard, tensorboard/); confusion_matrix.csv, "
        "test_predictions.csv and summary.json at the end (docs/runs.md).",
        formatter_class=HelpFormatter,
    )
    sections = {group: p.add_argument_group(title) if title else p for group, title in GROUPS.items()}
    for f in fields(RunConfig):
        add_option(sections[f.metadata["group"]], f.name)
    sections["data"].add_argument(
        "--resume", default=None, metavar="RUN_DIR",
        help="continue an interrupted or failed run in place from its last checkpoint (taken at every epoch's end "
        "and where a SIGINT/SIGTERM stopped it), with its own options; options given with it must agree with them, "
        "but --data may point to another copy of the data, the logging options may change, and a larger --epochs "
        "extends the run (a finished one too) to that many epochs, for --schedule step and cosine-restarts, whose lr "
        "does not depend on the total")
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse a command line into a validated :class:`RunConfig` (argparse exits 2 on bad input)."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[RunConfig, Path | None]:
    """The command line as a :class:`RunConfig` plus the ``--resume`` run directory, if any.

    With ``--resume``, the configuration is the run's own ``config.json``, and any option given
    beside it must agree with it (:data:`RESUME_MAY_CHANGE` excepted), but for a larger ``--epochs``, which
    extends the run (:func:`check_extension`)."""
    parser = build_parser()
    for flag in set(sys.argv[1:] if argv is None else argv) & set(REPLACED_FLAGS):
        parser.error(f"{flag} is now {REPLACED_FLAGS[flag]}")
    args = parser.parse_args(argv)
    names = {f.name for f in fields(RunConfig)}
    if args.resume is None:
        if args.mode is None:
            parser.error("the following arguments are required: --mode")
        return RunConfig(**{k: v for k, v in vars(args).items() if k in names}), None

    run_dir = Path(args.resume)
    try:
        stored = config_from_json(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"--resume {run_dir}: not a mixprec run directory ({type(e).__name__} reading "
                         "config.json); pass a directory under results/runs/") from None
    for action in parser._actions:  # parse again without defaults: what did the user actually type?
        action.default = argparse.SUPPRESS
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if k in names}
    if given.get("epochs", stored.epochs) != stored.epochs:
        check_extension(stored, given["epochs"], run_dir)
    for key, value in given.items():
        if key not in (*RESUME_MAY_CHANGE, "epochs") and value != getattr(stored, key):
            option = option_name(key)
            raise UsageError(f"--resume {run_dir}: {option} {value!r} conflicts with the run's own "
                             f"{getattr(stored, key)!r}; drop the option, or start a new run")
    return replace(stored, **{k: given[k] for k in (*RESUME_MAY_CHANGE, "epochs") if k in given}), run_dir


def check_extension(stored: RunConfig, epochs: int, run_dir: Path) -> None:
    """Whether ``--resume run_dir --epochs epochs`` may extend the run of ``stored``: to more epochs than its
    own, and only when its learning-rate schedule does not depend on the total (:data:`EXTENDABLE_SCHEDULES`),
    so that the extended run's lr is exactly what a run of ``epochs`` epochs would have had (as Lightning's
    ``max_epochs`` raised on a resumed fit). A :class:`UsageError` otherwise."""
    if epochs < stored.epochs:
        raise UsageError(f"--resume {run_dir}: --epochs {epochs} is fewer than the run's own {stored.epochs}; "
                         f"--epochs only extends a run (give more than {stored.epochs}), or start a new run")
    if stored.schedule not in EXTENDABLE_SCHEDULES:
        raise UsageError(f"--resume {run_dir}: --epochs {epochs} cannot extend a --schedule {stored.schedule} run, "
                         f"whose lr anneals to 0 over its own {stored.epochs} epochs (a {epochs}-epoch run's would "
                         f"not have); start a new run with --epochs {epochs}")


def option_name(name: str) -> str:
    """The command-line spelling of a :class:`RunConfig` field (a switched-off flag reads ``--no-...``)."""
    f = next(f for f in fields(RunConfig) if f.name == name)
    return f.metadata["flag"] or f"--{name.replace('_', '-')}"


def loss_scaler_kind(mode: str, amp_dtype: str | None, loss_scale: str) -> str | None:
    """Which loss scaler a run trains with (summary.json's ``loss_scaler``): ``GradScaler`` in amp with float16
    (``amp_dtype`` resolved), manual mode's ``dynamic``, ``none`` or ``static`` (``--loss-scale``), else None."""
    if mode == "amp":
        return "GradScaler" if amp_dtype == "float16" else None
    if mode == "manual":
        return loss_scale if loss_scale in ("dynamic", "none") else "static"
    return None


def upgrade(saved: dict) -> dict:
    """A ``config.json`` as this version writes it. Runs made before ``--fp8`` say ``manual_dtype: float8`` and
    ``fp8_scaling`` instead: an FP16 model with that FP8 recipe. Runs made before ``--master-weights`` say
    ``master_weights: true`` (``fp32``) or ``false`` (``--no-master-weights``, now ``none``)."""
    saved = dict(saved)
    scaling = saved.pop("fp8_scaling", "delayed")
    if saved.get("manual_dtype") == "float8":
        saved["manual_dtype"], saved["fp8"] = "float16", scaling
    if isinstance(saved.get("master_weights"), bool):
        saved["master_weights"] = "fp32" if saved["master_weights"] else "none"
    return saved


def config_from_json(saved: dict) -> RunConfig:
    """A :class:`RunConfig` back from ``config.json`` (JSON turns tuples into lists; older runs are upgraded)."""
    saved = upgrade(saved)
    saved["inject_overflow"] = tuple(saved.get("inject_overflow", ()))
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in saved.items() if k in known})
