"""Typed run configuration: one dataclass that the CLI fills and every run records as JSON."""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transferlab.errors import TransferlabError

# A name, not a path: it resolves to a local folder of that name on the weights search path
# (backbones/search.py; scripts/setup.sh adds the bundled ../shared/weights), else to the Hub.
DEFAULT_BACKBONE = "mobilenetv2_100.tf_quant_in1k"

# Every vocabulary of the options as plain names, here so that checking a config imports nothing
# heavy and nothing above this module. The registries that implement them (strategies.STRATEGIES,
# heads.HEADS, augment.PRESETS) are keyed by exactly these names (tests/test_config.py checks).
STRATEGY_NAMES: tuple[str, ...] = (
    "features", "frozen", "finetune", "scratch-basic", "scratch-regularized", "scratch-timm"
)  # fmt: skip
# Not a strategy but a chooser among them (selection.auto): backbone, strategy and recipe picked
# on train/val within --time-budget.
AUTO = "auto"
DEFAULT_TIME_BUDGET = "10m"
HEAD_NAMES: tuple[str, ...] = ("linear", "mlp")
AUGMENT_PRESETS: tuple[str, ...] = ("none", "tutorial", "light", "strong")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "rmsprop")
SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "step", "constant")
BN_POLICIES: tuple[str, ...] = ("frozen", "train")
ENGINES: tuple[str, ...] = ("auto", "openvino", "onnxruntime", "torch")
PRECISIONS: tuple[str, ...] = (
    "32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", "16-true"
)  # fmt: skip
MIN_IMAGE_SIZE = 16
# test-time augmentation: "flip" = image + mirror (2 views), "flip5crop" = 5 crops x mirror (10)
TTA_MODES: tuple[str, ...] = ("none", "flip", "flip5crop")
TRACKERS: tuple[str, ...] = ("mlflow",)


# Options whose default depends on the strategy (None in FitConfig: "the strategy's"), as data so
# that --help spells them out and each strategy reads its own from here.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "frozen": {"epochs": 50, "lr": 1e-3, "augment": "light"},
    # LP-FT (Kumar et al. 2022): from the phase-1 head, head and body at a low rate, briefly
    "finetune": {"epochs": 2, "lr": 2e-5, "augment": "light"},
    "scratch-basic": {"epochs": 30, "lr": 1e-4, "augment": "none"},
    "scratch-regularized": {"epochs": 30, "lr": 1e-4, "augment": "none"},
    "scratch-timm": {"epochs": 30, "lr": 1e-3, "augment": "light"},
}


def _by_strategy(option: str) -> str:
    """``frozen 50, finetune 5, scratch-basic 30, …`` for the help text."""
    return ", ".join(f"{name} {d[option]:g}" if isinstance(d[option], float) else
                     f"{name} {d[option]}" for name, d in STRATEGY_DEFAULTS.items())  # fmt: skip


def _opt(default: Any, help: str) -> Any:
    """A config field with its help text: the CLI builds each option from it (``cli.fit``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class FitConfig:
    """Every knob of ``fit``. Defaults are the recommended recipe, not placeholders."""

    # what to train
    backbone: str = _opt(
        DEFAULT_BACKBONE, "timm name, a weights folder name, hf-hub:REPO or local-dir:PATH."
    )
    pretrained: bool = _opt(True, "--no-pretrained: random init.")
    strategy: str = _opt("features", "features | frozen | finetune | scratch-… | auto")
    time_budget: str | float | None = _opt(
        None, f"auto: wall-clock budget: 10m, 90s, 1h or seconds (default {DEFAULT_TIME_BUDGET})."
    )
    head: str = _opt("linear", "linear | mlp")
    seed: int = _opt(42, "Seed of the carved splits, initialisation and data order.")
    # data
    label_regex: str | None = _opt(None, "Label = first group of this regex.")
    val_fraction: float = _opt(0.2, "Carved from train when there is no val.")
    test_fraction: float = _opt(0.2, "Carved from train when there is no test.")
    strict: bool = _opt(False, "Fail on any unusable image instead of skipping.")
    max_pixels: int = _opt(89_478_485, "Refuse larger images (bomb guard).")
    class_weight: str | None = _opt(None, "'auto': inverse class frequency.")
    # feature extraction
    engine: str = _opt("auto", "Frozen base runtime: auto|openvino|onnxruntime|torch")
    cache_dir: str | None = _opt(None, "Feature cache (default: user cache dir).")
    batch_size: int = _opt(32, "Images per batch.")
    workers: int | None = _opt(
        None, "Decode threads for features, DataLoader processes for training (default: cores)."
    )
    # end-to-end training (frozen / finetune / scratch strategies)
    epochs: int | None = _opt(None, f"Training epochs. Default: {_by_strategy('epochs')}.")
    lr: float | None = _opt(
        None, f"Learning rate (head; body gets lr × lr-mult). Default: {_by_strategy('lr')}."
    )
    optimizer: str = _opt("adamw", "adamw | sgd | rmsprop")
    schedule: str = _opt("cosine", "cosine | onecycle | step | constant")
    warmup_epochs: float = _opt(0.0, "Linear LR warm-up, in epochs.")
    weight_decay: float = _opt(0.01, "Decoupled weight decay (AdamW) or L2 (SGD/RMSprop).")
    label_smoothing: float = _opt(0.0, "Cross-entropy label smoothing.")
    patience: int | None = _opt(5, "Early stopping patience (epochs).")
    max_time: float | None = _opt(None, "Training time budget in seconds.")
    augment: str | None = _opt(
        None, f"none | tutorial | light | strong. Default: {_by_strategy('augment')}."
    )
    unfreeze: str = _opt("2", "finetune: top stages to unfreeze, or 'all'.")
    lr_mult: float = _opt(1.0, "finetune: body LR multiplier (1: head and body at --lr, LP-FT).")
    gradual: bool = _opt(False, "finetune: unfreeze one more stage per epoch.")
    bn: str = _opt("frozen", "BatchNorm policy: frozen | train")
    image_size: int | None = _opt(
        None,
        "Input size (shorter side). Scratch CNNs: 150 (the tutorial's). Pretrained backbones: "
        "8/7 of the size they were trained at (FixRes: 224 -> 256); give their own to match it.",
    )
    accelerator: str = _opt("auto", "Lightning accelerator: auto (a GPU if any) | cpu | gpu | mps")
    devices: int | str = _opt(1, "Lightning devices: a count or 'auto'.")
    dist_strategy: str = _opt("auto", "Lightning strategy: auto | ddp | ddp_spawn")
    num_nodes: int | None = _opt(None, "Lightning nodes (default: the SLURM job's, else 1).")
    precision: str = _opt("32-true", "32-true | bf16-mixed | 16-mixed")
    deterministic: bool = _opt(True, "Reproducible kernels and data order.")
    resume: bool = _opt(
        False, "Continue an interrupted run from OUT.partial/checkpoints/last.ckpt."
    )
    overwrite: bool = _opt(False, "Replace the run already in OUT (else it is refused).")
    track: str | None = _opt(None, "Log the run to an experiment tracker: mlflow.")

    def validate(self, *, cli: bool = True) -> FitConfig:
        """Check every option up front; a bad one is a TransferlabError naming it and what it
        takes: as the CLI's flag (``--epochs 'ten'``), or with ``cli=False`` as the Python
        argument (``epochs='ten'``). Normalizes ``class_weight="none"`` to None. Returns
        ``self``."""
        _STYLE.append(cli)
        try:
            return self._validate()
        finally:
            _STYLE.pop()

    def _validate(self) -> FitConfig:
        _choice("strategy", self.strategy, (*STRATEGY_NAMES, AUTO))
        if self.time_budget is not None:
            self.budget_seconds()  # a bad one fails here, before any work
        _choice("head", self.head, HEAD_NAMES)
        if self.class_weight not in (None, "auto", "none"):
            raise TransferlabError(
                f"{_said('class-weight', self.class_weight)} is unknown; choose 'auto' or 'none'"
            )
        if self.class_weight == "none":
            self.class_weight = None
        _check_fractions(self.val_fraction, self.test_fraction)
        _integer("batch-size", self.batch_size, 1)
        _integer("seed", self.seed, 0)
        _integer("max-pixels", self.max_pixels, 1)
        if self.workers is not None:
            _integer("workers", self.workers, 0, "or unset (automatic)")
        _choice("engine", self.engine, ENGINES)
        if self.epochs is not None:
            _integer("epochs", self.epochs, 1, "or unset (the strategy's default)")
        if self.lr is not None and not _finite(self.lr, above=0):
            raise TransferlabError(
                f"{_said('lr', self.lr)}: give a learning rate > 0, or leave it unset (the "
                "strategy's default)"
            )
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        if not _finite(self.warmup_epochs, at_least=0):
            raise TransferlabError(f"{_said('warmup-epochs', self.warmup_epochs)} must be >= 0")
        if not _finite(self.weight_decay, at_least=0):
            raise TransferlabError(f"{_said('weight-decay', self.weight_decay)} must be >= 0")
        if not (_finite(self.label_smoothing, at_least=0) and self.label_smoothing < 1):
            raise TransferlabError(
                f"{_said('label-smoothing', self.label_smoothing)} must be in [0, 1)"
            )
        if self.patience is not None:
            _integer("patience", self.patience, 1, "or unset (no early stopping)")
        if self.max_time is not None and not _finite(self.max_time, at_least=0):
            raise TransferlabError(
                f"{_said('max-time', self.max_time)}: give seconds >= 0, or leave it unset "
                "(no budget)"
            )
        if self.augment is not None:
            _choice("augment", self.augment, AUGMENT_PRESETS, "or unset (the strategy's default)")
        _check_unfreeze(self.unfreeze)
        if not _finite(self.lr_mult, above=0):
            raise TransferlabError(
                f"{_said('lr-mult', self.lr_mult)} must be > 0 (body LR: lr x it)"
            )
        _choice("bn", self.bn, BN_POLICIES)
        if self.image_size is not None:
            _integer("image-size", self.image_size, MIN_IMAGE_SIZE, "or unset (the default)")
        _check_devices(self.devices)
        _choice("precision", self.precision, PRECISIONS)
        if self.track is not None:
            _choice("track", self.track, TRACKERS, "or unset (no tracking)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def budget_seconds(self) -> float:
        """``--time-budget`` in seconds (``10m``, ``90s``, ``1.5h``, ``600``)."""
        text = str(DEFAULT_TIME_BUDGET if self.time_budget is None else self.time_budget)
        text = text.strip().lower()
        scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 1)
        number = text[:-1] if text[-1:] in "smh" else text
        try:
            seconds = float(number) * scale
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise TransferlabError(
                f"{_said('time-budget', self.time_budget)}: give a duration such as 10m, 90s, "
                "1h or a number of seconds"
            )
        return seconds

    def resolved(self, option: str) -> Any:
        """The option as given, else this strategy's default (``STRATEGY_DEFAULTS``)."""
        value = getattr(self, option)
        return STRATEGY_DEFAULTS[self.strategy][option] if value is None else value

    def cli_flags(self) -> list[str]:
        """The ``fit`` flags that give this config (options left at their default omitted;
        ``--resume``/``--overwrite`` too: they say what to do with OUT, not how to train)."""
        flags: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("resume", "overwrite") or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                flags += [flag, str(value)]
        return flags

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Whether validate's messages name CLI flags (True) or Python arguments; set by validate.
_STYLE: list[bool] = [True]


def _said(option: str, value: Any) -> str:
    """``--max-time -5.0`` for the CLI, ``max_time=-5.0`` for Python (``option``: flag form)."""
    if _STYLE[-1]:
        return f"--{option} {value!r}"
    return f"{option.replace('-', '_')}={value!r}"


def _flags(a: str, b: str, joiner: str) -> str:
    if _STYLE[-1]:
        return f"--{a}{joiner}--{b}"
    return f"{a.replace('-', '_')}{joiner}{b.replace('-', '_')}"


def _choice(option: str, value: Any, valid: Any, extra: str = "") -> None:
    if value not in valid:
        tail = f" {extra}" if extra else ""
        raise TransferlabError(
            f"{_said(option, value)} is unknown; choose one of {', '.join(valid)}{tail}"
        )


def _integer(option: str, value: Any, least: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        tail = f" {extra}" if extra else ""
        raise TransferlabError(f"{_said(option, value)}: give an integer >= {least}{tail}")


def _finite(value: Any, *, above: float | None = None, at_least: float | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if above is not None and not value > above:
        return False
    return at_least is None or value >= at_least


def _check_fractions(val: Any, test: Any) -> None:
    if not 0 <= val < 1 or not 0 <= test < 1:
        raise TransferlabError(
            f"{_flags('val-fraction', 'test-fraction', ' and ')} must be in [0, 1)"
        )
    if val + test >= 1:
        raise TransferlabError(
            f"{_flags('val-fraction', 'test-fraction', ' + ')} must leave images to train on"
        )


def _check_unfreeze(value: Any) -> None:
    text = str(value).strip().lower()
    if text == "all":
        return
    try:
        ok = int(text) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise TransferlabError(
            f"{_said('unfreeze', value)}: give a number of top stages >= 1, or 'all'"
        )


def _check_devices(value: Any) -> None:
    """Lightning's devices: a count >= 1, -1 or 'auto' (all), or device indices like '0,1'."""
    if isinstance(value, int) and not isinstance(value, bool):
        ok = value >= 1 or value == -1
    elif isinstance(value, str):
        text = value.strip()
        parts = [p.strip() for p in text.rstrip(",").split(",")]
        indices = "," in text  # "0," or "0,1": which devices; "2": how many
        ok = text in ("auto", "-1") or (
            all(p.isdigit() for p in parts) and (indices or int(parts[0]) >= 1)
        )
    else:
        ok = False
    if not ok:
        raise TransferlabError(
            f"{_said('devices', value)}: give a count >= 1, 'auto' or -1 (every device), or device "
            "indices such as '0,1'"
        )


def config_from(options: dict[str, Any]) -> FitConfig:
    """``FitConfig(**options)``; an unknown name is an error naming the closest valid ones."""
    known = [f.name for f in fields(FitConfig)]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(known)}"
            raise TransferlabError(f"fit() got an unknown option {name}={options[name]!r}; {hint}")
    return FitConfig(**options)


def with_options(func: Any) -> Any:
    """Give ``func`` (``fit``) a real signature and help: FitConfig's fields as keyword-only
    parameters, typed and defaulted, each documented with the field's help text."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    lines = ["", "    Options:"]
    for f in fields(FitConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=f.type))  # fmt: skip
        lines.append(f"        {f.name}: {f.type} = {f.default!r}  {f.metadata.get('help', '')}")
    func.__signature__ = sig.replace(parameters=params)
    func.__doc__ = (func.__doc__ or "") + "\n".join(lines) + "\n"
    return func
