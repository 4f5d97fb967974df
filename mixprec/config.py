"""Run configuration: the frozen :class:`RunConfig`, its command line, and its validation.

Everything a run varies is one field here, and ``config.json`` is ``asdict(cfg)``.
Options that depend on the device (``--device auto``, ``--amp-dtype auto``,
``--half-compute auto``) stay as given in the config; the resolved values are
recorded next to them in ``summary.json`` by the trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .cli import OneLineParser, UsageError
from .models import MODELS, has_pretrained

MODES = ("baseline", "amp", "manual")
SCHEDULES = ("step", "cosine", "cosine-restarts")
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("auto", "float16", "bfloat16")
HALF_COMPUTES = ("auto", "native", "emulated")
MANUAL_DTYPES = ("float16", "bfloat16", "float8")
FP8_SCALINGS = ("delayed", "current")
ON_MIN_SCALE = ("raise", "skip")
RESUME_MAY_CHANGE = ("data",)  # options that --resume lets differ from the run's own
# the manual-mode ablation and scaler options: summary.json's "ablation" entry, and a study combination's label
# names those not at their default
ABLATION_OPTIONS = ("loss_scale", "on_min_scale", "master_weights", "fp16_batchnorm", "manual_dtype",
                    "inject_overflow", "clip_grad_norm", "accumulate", "telemetry_every", "fp8_scaling",
                    "fp8_amax_history", "fp8_margin", "fp8_all_layers")


@dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults follow the seed thesis (Oreč 2021): SGD, lr 0.1,
    momentum 0.9, batch 128, lr halved every 20 epochs, 50 epochs."""

    mode: str
    model: str = "resnet18"
    pretrained: bool = False
    channels_last: bool = False
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    warmup_epochs: float = 0.0  # cosine only: linear warm-up before the cosine decay
    label_smoothing: float = 0.0  # training loss only; evaluation is plain cross-entropy
    nesterov: bool = False
    crop_padding: int = 4  # training augmentation: zero-pad by this much, random crop back (and flip)
    test_time_flip: bool = False  # validation and test: mean logits of each image and its mirror image
    seed: int = 0
    device: str = "auto"
    amp_dtype: str = "auto"
    half_compute: str = "auto"
    data: str | None = None
    subset: int | None = None
    test_subset: int | None = None
    out: str = "results"
    # ablations and scaler controls (manual mode unless noted)
    loss_scale: str = "dynamic"
    on_min_scale: str = "raise"
    master_weights: bool = True
    fp16_batchnorm: bool = False
    manual_dtype: str = "float16"
    inject_overflow: tuple[int, ...] = ()  # manual and float16 amp
    inject_overflow_rank: int | None = None  # under torchrun: only this rank overflows (None: every rank)
    clip_grad_norm: float | None = None  # every mode
    accumulate: int = 1  # every mode
    telemetry_every: int = 10  # every mode
    # FP8 (--manual-dtype float8 only)
    fp8_scaling: str = "delayed"
    fp8_amax_history: int = 16
    fp8_margin: int = 0
    fp8_all_layers: bool = False
    deterministic: bool = False
    tf32: bool = True
    compile: bool = False

    def __post_init__(self):
        """The one place where option values are checked, for the command line and for code alike."""
        for option, value, allowed in (("mode", self.mode, MODES), ("model", self.model, tuple(MODELS)),
                                       ("schedule", self.schedule, SCHEDULES), ("device", self.device, DEVICES),
                                       ("amp-dtype", self.amp_dtype, AMP_DTYPES),
                                       ("half-compute", self.half_compute, HALF_COMPUTES),
                                       ("manual-dtype", self.manual_dtype, MANUAL_DTYPES),
                                       ("on-min-scale", self.on_min_scale, ON_MIN_SCALE),
                                       ("fp8-scaling", self.fp8_scaling, FP8_SCALINGS)):
            if value not in allowed:
                raise UsageError(f"unknown --{option} {value!r}: choose one of {', '.join(allowed)}")
        if self.pretrained and not has_pretrained(self.model):
            raise UsageError(f"--pretrained: there are no ImageNet weights for {self.model}; pick a model built from "
                             "torchvision or timm")
        counts = {"epochs": self.epochs, "batch-size": self.batch_size, "subset": self.subset,
                  "test-subset": self.test_subset, "accumulate": self.accumulate,
                  "telemetry-every": self.telemetry_every, "fp8-amax-history": self.fp8_amax_history}
        for option, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UsageError(f"--{option} must be a positive integer, got {value!r}")
        for option, value in (("seed", self.seed), ("crop-padding", self.crop_padding)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"--{option} must be a non-negative integer, got {value!r}")
        for option, value, minimum in (("lr", self.lr, "positive"), ("momentum", self.momentum, "non-negative"),
                                       ("weight-decay", self.weight_decay, "non-negative")):
            if (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                    or (minimum == "positive" and value == 0)):
                raise UsageError(f"--{option} must be a {minimum} number, got {value!r}")
        if self.nesterov and self.momentum == 0:
            raise UsageError("--nesterov needs momentum: give --momentum a positive value (e.g. 0.9)")
        if (not isinstance(self.label_smoothing, (int, float)) or not math.isfinite(self.label_smoothing)
                or not 0 <= self.label_smoothing < 1):
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if (not isinstance(self.warmup_epochs, (int, float)) or not math.isfinite(self.warmup_epochs)
                or not 0 <= self.warmup_epochs < self.epochs):
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
        manual_only = {"--loss-scale": self.loss_scale != "dynamic", "--on-min-scale": self.on_min_scale != "raise",
                       "--no-master-weights": not self.master_weights, "--fp16-batchnorm": self.fp16_batchnorm,
                       "--manual-dtype": self.manual_dtype != "float16"}
        for option, used in manual_only.items():
            if used and self.mode != "manual":
                raise UsageError(f"{option} is an ablation of manual mode; use it with --mode manual")
        if isinstance(self.fp8_margin, bool) or not isinstance(self.fp8_margin, int) or self.fp8_margin < 0:
            raise UsageError(f"--fp8-margin must be a non-negative integer (scales divide by 2^M), "
                             f"got {self.fp8_margin!r}")
        fp8_only = {"--fp8-scaling": self.fp8_scaling != "delayed", "--fp8-amax-history": self.fp8_amax_history != 16,
                    "--fp8-margin": self.fp8_margin != 0, "--fp8-all-layers": self.fp8_all_layers}
        for option, used in fp8_only.items():
            if used and (self.mode != "manual" or self.manual_dtype != "float8"):
                raise UsageError(f"{option} sets up FP8 training; use it with --mode manual --manual-dtype float8")
        if self.fp8_scaling == "current" and self.fp8_amax_history != 16:
            raise UsageError("--fp8-amax-history is the history of delayed scaling; --fp8-scaling current keeps none")
        if self.manual_dtype == "float8" and self.half_compute == "native":
            raise UsageError("--manual-dtype float8 is emulated FP8 (there are no FP8 kernels here); drop "
                             "--half-compute native")
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.inject_overflow):
            raise UsageError(f"--inject-overflow takes optimizer steps counted from 1, got {self.inject_overflow!r}")
        if self.inject_overflow and self.mode == "baseline":
            raise UsageError("--inject-overflow needs a loss scaler to skip the step: use --mode manual, "
                             "or amp with float16")
        if self.inject_overflow and self.mode == "amp" and self.amp_dtype == "bfloat16":
            raise UsageError("--inject-overflow in amp mode needs a GradScaler, which only float16 uses: "
                             "drop --amp-dtype bfloat16, or use --mode manual")
        if self.inject_overflow_rank is not None and (not self.inject_overflow or self.inject_overflow_rank < 0):
            raise UsageError("--inject-overflow-rank takes a rank (0, 1, ...) and needs --inject-overflow")


def warn_if_slow(half_compute: str, dtype: str, device_type: str) -> None:
    """The check that needs the device resolved (``--device auto``): a choice that is valid but slow warns."""
    if half_compute == "native" and device_type == "cpu" and dtype == "float16":
        warnings.warn("--half-compute native on a CPU runs PyTorch's naive FP16 kernels (measured here: 25-200x "
                      "slower than FP32 for resnet20); use --half-compute emulated (the CPU default)", stacklevel=4)


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device``, defined here once, for every command that trains or times a model."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda if available, else cpu")


def add_precision_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--amp-dtype`` and ``--half-compute``: defined here once, for ``mixprec.run`` and
    ``mixprec.bench_infer`` alike (``--manual-dtype``, which only ``mixprec.run`` takes, is with its ablations)."""
    add_device_option(p)
    p.add_argument("--amp-dtype", choices=AMP_DTYPES, default="auto",
                   help="autocast dtype in amp mode. auto: float16 on every device, with torch.amp.GradScaler "
                   "(PyTorch's FP16 recipe, the reference for manual mode). bfloat16: autocast without a loss "
                   "scaler, a variant that is faster than FP32 only on CPUs with bf16 units (AVX-512-BF16, AMX) "
                   "and --half-compute native.")
    p.add_argument("--half-compute", choices=HALF_COMPUTES, default="auto",
                   help="how the half-precision convolutions, linears and matmuls of amp and manual mode run. "
                   "native: PyTorch's own half kernels (on a CPU, FP16 ones are 25-200x slower than FP32). "
                   "emulated: half operands, FP32 accumulation, half results and saved tensors, as tensor cores "
                   "do, computed with FP32 kernels. auto: native on CUDA, emulated on CPU.")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m mixprec.run",
        description="Train one CNN on CIFAR-10 in one precision mode and write a run directory "
        "(config.json, env.json, epochs.csv, confusion_matrix.csv, summary.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mode", choices=MODES,
                   help="baseline: FP32. amp: torch.autocast + torch.amp.GradScaler. "
                   "manual: FP16 model, FP32 BatchNorm, FP32 master weights, dynamic loss scaler.")
    p.add_argument("--model", default="resnet18", choices=tuple(MODELS),
                   help="architecture, adapted to 32x32 inputs (resnet20 is the one that trains in "
                   "minutes on a CPU)")
    p.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's or timm's ImageNet weights (downloaded once into TORCH_HOME or "
                   "HF_HOME), with a new classifier; layers the CIFAR adaptation replaced start fresh")
    p.add_argument("--channels-last", action="store_true",
                   help="keep the model's weights and the input batches in channels_last (NHWC) memory format, "
                   "which tensor cores prefer")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128,
                   help="training batch size; when you change it, scale --lr with it (linear scaling rule, Goyal "
                   "et al. 2017: batch 256 with lr 0.2 trains like batch 128 with lr 0.1, in half the steps)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (the peak one, after any warm-up)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum (needs --momentum > 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default="step",
                   help="step: lr halved every 20 epochs (seed thesis); cosine: cosine annealing to 0 "
                   "over the run; cosine-restarts: cosine annealing with warm restarts every 10, 20, "
                   "40... epochs (EfficientNet thesis)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, metavar="F",
                   help="with --schedule cosine: raise the lr linearly from lr/10 to --lr over the first F epochs "
                   "(fractions allowed, counted in optimizer steps), then anneal it to 0 over the rest of the run; "
                   "large peak lrs need this")
    p.add_argument("--label-smoothing", type=float, default=0.0, metavar="X",
                   help="train against targets smoothed by X (F.cross_entropy's label_smoothing): 1-X on the "
                   "label, X/10 spread over all classes; the training loss includes it, evaluation does not")
    p.add_argument("--crop-padding", type=int, default=4, metavar="N",
                   help="training augmentation: zero-pad each image by N pixels and crop a random 32x32 window "
                   "(0: flips only); a lighter augmentation fits faster in a short run")
    p.add_argument("--test-time-flip", action="store_true",
                   help="evaluate (validation and test) on the mean of the logits of each image and of its "
                   "horizontal mirror image, as airbench does; training is unchanged")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for initial weights, batch order and augmentation")
    add_precision_options(p)
    p.add_argument("--data", default=None,
                   help="CIFAR-10: a directory holding cifar-10-batches-py/, or an image-folder tree "
                   "train/<class>/*, test/<class>/* (or a .tar/.tar.gz of one). Default: $MIXPREC_DATA, "
                   "else ~/.cache/mixprec/cifar10, downloaded there by torchvision if absent.")
    p.add_argument("--subset", type=int, default=None,
                   help="train on only N images of the 45,000-image training split, stratified by class")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on stratified subsets of N images of the test set and at most N of the "
                   "5,000-image validation split (quick runs only; recorded in the summary)")
    p.add_argument("--out", default="results", help="results directory; the run goes to OUT/runs/<name>/")
    p.add_argument("--deterministic", action="store_true",
                   help="use PyTorch's deterministic algorithms (slower on CUDA); on a CPU a resumed run then ends "
                   "bit-identical to an uninterrupted one")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on Ampere and newer GPUs, turn off TF32, which PyTorch uses for FP32 convolutions by "
                   "default, so that baseline is true FP32 (summary.json records whether TF32 was on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the first steps then include compilation; images_per_s "
                   "excludes the first 20)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted or failed run in place from its last checkpoint (taken at every "
                   "epoch's end and where a SIGINT/SIGTERM stopped it), with its own options; options given with "
                   "it must agree with them, but --data may point to another copy of the data")
    g = p.add_argument_group("manual-mode ablations and loss-scaler controls")
    g.add_argument("--loss-scale", default="dynamic",
                   help="dynamic: start at 2^16, halve on overflow, double after 2000 clean steps; none: no "
                   "scaling (scale 1); a number: that static scale. Overflowing steps are skipped in every case.")
    g.add_argument("--on-min-scale", choices=ON_MIN_SCALE, default="raise",
                   help="when a backoff would take the dynamic scale below 1: raise ends the run as failed, "
                   "skip holds the scale at 1 and keeps skipping overflowing steps")
    g.add_argument("--no-master-weights", dest="master_weights", action="store_false",
                   help="let the optimizer update the FP16 weights in place: small updates vanish (1 + 1e-4 == 1 "
                   "in FP16)")
    g.add_argument("--fp16-batchnorm", action="store_true", help="run BatchNorm in FP16 too")
    g.add_argument("--manual-dtype", choices=MANUAL_DTYPES, default="float16",
                   help="the half type of manual mode; bfloat16 has FP32's exponent range and needs no loss "
                   "scaling. float8: an FP16 model whose convolutions and linears compute on emulated FP8 "
                   "operands (E4M3 activations and weights, E5M2 gradients, per-tensor scales, FP32 "
                   "accumulation, FP16 results)")
    g.add_argument("--inject-overflow", type=_step_list, default=(), metavar="STEP[,STEP...]",
                   help="make the scaled loss inf at these optimizer steps (1-based, counting skipped ones), to "
                   "watch a skip: manual mode, or amp with float16")
    g.add_argument("--inject-overflow-rank", type=int, default=None, metavar="RANK",
                   help="under torchrun, inject the overflow on this rank only (default: every rank); the others "
                   "must skip the step too")
    g.add_argument("--clip-grad-norm", type=float, default=None, metavar="X",
                   help="clip the gradient norm to X; with a loss scaler, the unscaled gradients are clipped")
    g.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="split each batch into N micro-batches whose gradients add up to one optimizer step "
                   "(one overflow decision per step); --batch-size stays the images per optimizer step")
    g.add_argument("--telemetry-every", type=int, default=10, metavar="N",
                   help="measure the largest gradient and the zero and FP16-underflow fractions (and with float8 "
                   "the FP8 saturation, flush-to-zero and scales) every N optimizer steps in manual mode "
                   "(steps.csv); the loss scale and skips are recorded at every step")
    f = p.add_argument_group("FP8 (with --mode manual --manual-dtype float8)")
    f.add_argument("--fp8-scaling", choices=FP8_SCALINGS, default="delayed",
                   help="delayed: each tensor's scale comes from the largest amax of its last --fp8-amax-history "
                   "uses (TransformerEngine's DelayedScaling; the first use scales from its own amax); current: "
                   "from the tensor's own amax")
    f.add_argument("--fp8-amax-history", type=int, default=16, metavar="N",
                   help="uses of each tensor whose amax delayed scaling remembers")
    f.add_argument("--fp8-margin", type=int, default=0, metavar="M",
                   help="headroom: scale = format max / (amax * 2^M)")
    f.add_argument("--fp8-all-layers", action="store_true",
                   help="quantize the first convolution and the classifier too (by default they stay FP16, as in "
                   "the FP8 paper)")
    return p


def _step_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step numbers like 3,10,25, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse a command line into a validated :class:`RunConfig` (argparse exits 2 on bad input)."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[RunConfig, Path | None]:
    """The command line as a :class:`RunConfig` plus the ``--resume`` run directory, if any.

    With ``--resume``, the configuration is the run's own ``config.json``, and any option given
    beside it must agree with it (:data:`RESUME_MAY_CHANGE` excepted)."""
    parser = build_parser()
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
    for key, value in given.items():
        if key not in RESUME_MAY_CHANGE and value != getattr(stored, key):
            option = option_name(key)
            raise UsageError(f"--resume {run_dir}: {option} {value!r} conflicts with the run's own "
                             f"{getattr(stored, key)!r}; drop the option, or start a new run")
    return replace(stored, **{k: given[k] for k in RESUME_MAY_CHANGE if k in given}), run_dir


def option_name(field: str) -> str:
    """The command-line spelling of a :class:`RunConfig` field (switched-off flags read ``--no-...``)."""
    return {"master_weights": "--no-master-weights", "tf32": "--no-tf32"}.get(field, f"--{field.replace('_', '-')}")


def config_from_json(saved: dict) -> RunConfig:
    """A :class:`RunConfig` back from ``config.json`` (JSON turns tuples into lists)."""
    saved = dict(saved)
    saved["inject_overflow"] = tuple(saved.get("inject_overflow", ()))
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in saved.items() if k in known})
