"""Job YAML -> typed, validated dataclasses.

Every error is a ``ConfigError`` naming the full key path (``train.steps``) and, for unknown keys,
the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from gensuite.errors import ConfigError


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    dataset: str = "digits"  # shard set: <root>/<dataset>/manifest.json
    root: str = "shards"  # folder holding shard sets; relative paths are taken from the cwd
    workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples held by the shuffle buffer
    reference_split: str = "test"  # fixed held-out batch shown next to samples (reconstructions)
    on_bad_sample: Literal["error", "skip"] = "error"  # a sample that fails to decode: stop, or skip and count it

    def __post_init__(self):
        _check(self.workers >= 0, "data.workers", "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")


@dataclass
class OptimizerSpec:
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd / rmsprop
    eps: float = 1e-8
    # After warm-up: constant; cosine or linear decay to 0 at the last step; or step: multiply by
    # decay_factor every decay_every_epochs epochs (StackGAN halves its rates every 50/100 epochs).
    schedule: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_steps: int = 0
    decay_every_epochs: Optional[float] = None  # schedule: step
    decay_factor: float = 0.5  # schedule: step
    grad_clip: Optional[float] = None  # max global grad norm; None logs the norm without clipping

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "each beta must be in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.schedule != "step" or (self.decay_every_epochs or 0) > 0, "optim.decay_every_epochs",
               "schedule: step needs decay_every_epochs > 0 (e.g. 50)")
        _check(0 < self.decay_factor <= 1, "optim.decay_factor", "must be in (0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")


@dataclass
class OptimConfig(OptimizerSpec):
    # Per-player overrides of the fields above, e.g. {D: {lr: 4.0e-4}} for a two-time-scale GAN.
    players: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for player in self.players:  # each player's settings are checked at load time, under their own key
            self.for_player(player)

    def for_player(self, player: str) -> OptimizerSpec:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerSpec)}
        overrides = self.players.get(player) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"optim.players.{player}", f"expected a mapping of optimizer settings such as "
                                                         f"{{lr: 1.0e-4}}, got {_describe(overrides)}")
        base.update(overrides)
        try:
            return from_dict(OptimizerSpec, base, f"optim.players.{player}")
        except ConfigError as e:  # OptimizerSpec's own checks name optim.<key>: name the override instead
            key = e.path.removeprefix("optim.")
            if e.path.startswith("optim.") and "." not in key and key in overrides:
                raise ConfigError(f"optim.players.{player}.{key}", e.message) from None
            raise


@dataclass
class EmaConfig:
    networks: list[str] = field(default_factory=list)  # e.g. [G]; sampled from in grids
    decay: float = 0.999
    # min(decay, (1 + n) / (10 + n)) at update n: a short run's average is not dominated by the
    # initial weights (a zero-initialised diffusion output would otherwise linger ~ decay^n)
    warmup: bool = False

    def __post_init__(self):
        _check(0 < self.decay < 1, "train.ema.decay", "must be in (0, 1)")


@dataclass
class DeepSpeedConfig:
    # ZeRO-1 partitions optimizer states across ranks, ZeRO-2 also gradients. ZeRO-3 (partitioned
    # parameters) is refused: sample grids, EMA and checkpoints here need whole parameters on rank 0.
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimizer states and their update in CPU memory

    def __post_init__(self):
        _check(self.zero_stage in (1, 2), "train.deepspeed.zero_stage",
               f"{self.zero_stage} is not supported; use 1 (optimizer states) or 2 (also gradients)")


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # training iterations (one step of every player); or give epochs
    epochs: Optional[float] = None
    # Minutes of training (the steps themselves, not evaluation, grids or checkpoints; summed over
    # resumes) after which the run ends as at its last step: final grids, evaluation and checkpoint.
    # train.steps or epochs stay an upper bound (and set the LR schedule's length). None: no budget.
    time_budget_min: Optional[float] = None
    batch_size: int = 64  # global batch size, split across ranks
    micro_batch_size: Optional[int] = None  # per-rank forward size; smaller -> gradient accumulation
    seed: int = 0
    precision: Literal["no", "fp16", "bf16"] = "no"
    # auto | never | PATH: a checkpoint file or run directory to start from; one at train.steps
    # already is evaluated with this job's eval section (and grids), e.g. with another sampler
    resume: str = "auto"
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    ema: EmaConfig = field(default_factory=EmaConfig)
    strategy: Literal["ddp", "deepspeed"] = "ddp"  # how ranks share the work
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # used when strategy is deepspeed

    def __post_init__(self):
        _check((self.steps is None) != (self.epochs is None), "train.steps",
               "give exactly one of train.steps or train.epochs")
        _check(self.steps is None or self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.epochs is None or self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.time_budget_min is None or self.time_budget_min > 0, "train.time_budget_min",
               "must be > 0 minutes, or null for no budget")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        for key in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")


@dataclass
class LogConfig:
    tensorboard: bool = True
    grid_size: int = 64  # samples in each grid
    progress_bar: bool = True
    save_png: bool = True  # also write grids to <run>/samples/

    def __post_init__(self):
        _check(self.grid_size >= 1, "log.grid_size", "must be >= 1")


# Values that reach an sbatch script: plain tokens only, so no value can smuggle in a shell command.
_SLURM_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@+-]+$")
_SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:@+|&*\[\]()-]+$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def _check_token(value: Optional[str], path: str, pattern: re.Pattern = _SLURM_TOKEN,
                 allowed: str = "_ . , : @ + -") -> None:
    if value is not None and not pattern.match(value):
        raise ConfigError(path, f"{value!r} is refused: SLURM names use only letters, digits and {allowed}")


@dataclass
class LaunchConfig:
    """Where and how ``launch/submit.py`` runs the job on SLURM (ignored when it runs locally)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None  # per node
    timeout_min: int = 60
    constraint: Optional[str] = None
    exclusive: bool = False
    array_parallelism: int = 32  # sweep tasks running at once (the array's %)
    max_requeues: int = 3  # requeues after a timeout; preemptions do not count
    signal_delay_s: Optional[int] = None  # checkpoint signal this long before the limit (default min(90, half))
    setup: list[str] = field(default_factory=list)  # shell lines before the job, e.g. module load cuda
    sbatch_args: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH flags, e.g. {mail-type: END}
    log_folder: Optional[str] = None  # default <run root>/slurm

    def __post_init__(self):
        for key in ("partition", "account", "qos"):
            _check_token(getattr(self, key), f"launch.{key}")
        _check_token(self.constraint, "launch.constraint", _SLURM_CONSTRAINT, "_ . , : @ + - | & * [ ] ( )")
        for key in ("nodes", "cpus_per_task", "timeout_min", "array_parallelism"):
            _check(getattr(self, key) >= 1, f"launch.{key}", "must be >= 1")
        _check(self.gpus_per_node >= 0, "launch.gpus_per_node", "must be >= 0")
        _check(self.tasks_per_node is None or self.tasks_per_node >= 1, "launch.tasks_per_node", "must be >= 1")
        _check(self.mem_gb is None or self.mem_gb > 0, "launch.mem_gb", "must be > 0")
        _check(self.max_requeues >= 0, "launch.max_requeues", "must be >= 0")
        _check(self.signal_delay_s is None or 0 < self.signal_delay_s < self.timeout_min * 60,
               "launch.signal_delay_s", "must be between 0 and the time limit in seconds")
        for i, line in enumerate(self.setup):
            _check(not _has_control_chars(line), f"launch.setup[{i}]",
                   "one shell line per list item; no newlines or control characters")
        for key, value in self.sbatch_args.items():
            _check(bool(_SBATCH_KEY.match(str(key))), f"launch.sbatch_args.{key}",
                   "expected an sbatch long option name such as mail-type")
            _check(isinstance(value, (str, int, float, bool)) and not _has_control_chars(str(value)),
                   f"launch.sbatch_args.{key}", "expected a single-line value")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def signal_delay(self) -> int:
        return self.signal_delay_s or min(90, self.timeout_min * 30)


def _has_control_chars(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


@dataclass
class SweepConfig:
    """Override sets, one run each: the cartesian product of ``variants`` with ``grid`` and each entry of ``sets``."""

    grid: dict[str, list[Any]] = field(default_factory=dict)  # {model.loss: [minimax, non_saturating]}
    sets: list[dict[str, Any]] = field(default_factory=list)  # [{optim.lr: 1.0e-4, train.seed: 1}, ...]
    # Named partial jobs merged into the job, e.g. {dcgan: {family: gan, flavor: dcgan, model: {ngf: 32}}}:
    # one that names a family or flavor starts its model section from that flavor's defaults.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        for key, values in self.grid.items():
            _check(len(values) > 0, f"sweep.grid.{key}", "needs at least one value")
        for name, variant in self.variants.items():
            _check(bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", str(name))), f"sweep.variants.{name}",
                   "a variant's name is its run directory: letters, digits and . _ + - only")
            for key in variant:
                _check(key not in ("sweep", "launch", "name"), f"sweep.variants.{name}.{key}",
                       "a variant sets training settings, not launch, sweep or name")


@dataclass
class EvalConfig:
    """Metrics computed on held-out data every ``every`` steps and at the end (``gensuite.evaluation``)."""

    every: Optional[int] = None  # steps between evaluations; None: only at the end
    metrics: Optional[list[str]] = None  # None: the family's defaults
    split: str = "test"  # real split the metrics use
    max_samples: Optional[int] = None  # evaluate the first N samples of the split (None: all)
    batch_size: int = 256
    # Validation curves: every player's training objective on this many batches of batch_size from the start
    # of the held-out split (validation if the shards have one, else `split`), capped by max_samples; 0: off
    validation_batches: int = 4
    importance_samples: int = 64  # k of the importance-weighted likelihood bound
    seed: int = 1234  # evaluation noise, drawn per sample: the same on any number of ranks
    best: Optional[str] = None  # keep checkpoints/best.pt by this metric, e.g. iwae
    classifier: Optional[str] = None  # run dir or checkpoint of a classifier job on the same data (clf_fid, cond_acc)
    n_samples: int = 10_000  # generated samples per evaluation (50,000 to compare with papers)
    inception_weights: Optional[str] = None  # InceptionV3 weights (else $GENSUITE_INCEPTION_WEIGHTS, hub cache)
    # Models with several samplers (diffusion): which one the generated samples come from; None: the model's
    sampler: Optional[str] = None  # ddpm, ddim, langevin
    sampler_steps: Optional[int] = None  # DDIM steps
    sampler_eta: Optional[float] = None  # DDIM's eta

    def __post_init__(self):
        _check(self.every is None or self.every >= 1, "eval.every", "must be >= 1 or null")
        _check(self.max_samples is None or self.max_samples >= 1, "eval.max_samples", "must be >= 1 or null")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.validation_batches >= 0, "eval.validation_batches",
               f"{self.validation_batches} is negative; use the number of held-out batches for the validation "
               f"curves (e.g. 4), or 0 to turn them off")
        _check(self.importance_samples >= 1, "eval.importance_samples", "must be >= 1")
        _check(self.n_samples >= 2, "eval.n_samples", "must be >= 2")


@dataclass
class JobConfig:
    family: str
    flavor: str
    model: Any  # the family's config_class
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000))
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ----------------------------------------------------------------------------------------------
# Loading


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(path, message)


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a job file, apply ``key=value`` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path}: no such job file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{path}:{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise ConfigError("", f"{path}: empty job file; it needs at least `family:` and `flavor:`")
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: a job file must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return job_from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """``train.steps=100`` -> raw["train"]["steps"] = 100 (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError("--set", f"{item!r}: expected key=value, e.g. train.steps=100")
    key, _, value = item.partition("=")
    set_key(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)


def set_key(raw: dict, key: str, value: Any) -> None:
    """raw["train"]["steps"] = value for key ``train.steps``, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "cannot set a sub-key of a non-mapping value")
    node[parts[-1]] = value


def job_from_dict(raw: dict) -> JobConfig:
    from gensuite.registry import families

    raw = dict(raw)
    known = families()
    family = raw.get("family")
    if family is None:
        raise ConfigError("family", f"missing; choose one of {', '.join(sorted(known))}")
    from gensuite.registry import get_family, installed_families

    if isinstance(family, str) and (":" in family or family in installed_families()):  # outside gensuite
        known[family] = get_family(family)
    if family not in known:
        raise ConfigError("family", f"unknown family {family!r}{_did_you_mean(str(family), known)}; "
                                    f"choose one of {', '.join(sorted(known))} (or module.path:ClassName, or an installed "
                                    f"package's gensuite.families entry point)")
    cls = known[family]
    flavor = raw.get("flavor")
    if flavor not in cls.flavors:
        what = "missing" if flavor is None else f"unknown flavor {flavor!r} for family {family}"
        raise ConfigError("flavor", f"{what}{_did_you_mean(str(flavor), cls.flavors)}; "
                                    f"choose one of {', '.join(cls.flavors)}")
    model = dict(cls.flavors[flavor])
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("model", f"expected a mapping, got {type(model_raw).__name__}")
    model.update(model_raw)
    raw["model"] = model
    hints = typing.get_type_hints(JobConfig)
    hints["model"] = cls.config_class
    return _build_dataclass(JobConfig, raw, "", hints)


def from_dict(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types (errors name ``path``)."""
    return _convert(cls, raw, path)


def closest(name: str, options, cutoff: float = 0.6) -> str | None:
    """The option most like ``name``, ignoring case (players and networks are short names: G, D), or None."""
    lower = {str(o).lower(): o for o in options}
    match = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=cutoff)
    return lower[match[0]] if match else None


def _did_you_mean(key: str, options) -> str:
    close = closest(key, options)
    return f"; did you mean {close}?" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build_dataclass(cls: type, raw: Any, path: str, hints: dict | None = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {_describe(raw)}")
    hints = hints or typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            full = _join(path, str(key))
            hint = _did_you_mean(str(key), fields)
            if hint:
                hint = hint.replace("did you mean ", f"did you mean {_join(path, '')}")
            raise ConfigError(full, f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "missing required key")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(path, str(e)) from None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("", errors[0]) if len(errors) == 1 else ConfigError(path, f"invalid value {value!r}")
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as False; `precision: no` should mean "no".
        if value is False and "no" in args:
            value = "no"
        if value not in args:
            raise ConfigError(path, f"invalid value {value!r}{_did_you_mean(str(value), [str(a) for a in args])}; "
                                    f"choose one of {', '.join(map(str, args))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        # PyYAML reads 2e-4 (no dot) as a string; accept any string that parses as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_describe(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, path): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain YAML/JSON-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)
