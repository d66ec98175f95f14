"""The family contract and the registry that maps family names and flavors to implementations.

A *family* (VAE, GAN, diffusion, flow, EBM, ...) supplies networks, an objective per player and a
sampler. The training loop in ``gensuite.trainer`` knows nothing else about it. The contract covers:

- one objective (VAE, diffusion, flows, CNFs): a single player that owns every network;
- two players alternating (GAN zoo, StackGAN): ``players()`` returns e.g. D with ``steps=n_critic``
  then G; while one player steps, every other network is frozen and unwrapped from DDP;
- MCMC inner loops with persistent state (EBM replay buffer): ``state_dict``/``load_state_dict``
  are saved in every checkpoint;
- frozen sub-networks loaded from another run (StackGAN Stage-II uses Stage-I's generator):
  ``frozen_networks()`` names them and the run directory or checkpoint they come from;
- conditioning on class labels (``batch["y"]``) or other fields such as text embeddings
  (any extra key of the batch); families that sample for held-out conditions (text-to-image) ask
  for ``held_out_conditions`` samples (their ``condition_fields``) of the eval split once, through
  ``set_conditions``, and keep them in their state so a checkpoint alone can sample; a
  ``TextConditioned`` family also draws for new text (``gensuite sample --text``);
- optional abilities (``HasLikelihood``, ``Classifies``, ``TextConditioned``) are Protocols tested with
  isinstance, and hooks (``initialize``, ``after_step``, per-rank state) default to doing nothing;
- validation curves: ``validation_terms`` gives every player's loss terms on a held-out batch without
  changing any training state (its default calls ``loss`` without gradients, or with them where
  ``loss_needs_gradients`` says so; an EBM overrides it so its replay buffer is only read).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]  # "x": images in [0, 1] (N, C, H, W) or points (N, D); "y": labels (N,)
Visual = Any  # a (N, C, H, W) image batch in [0, 1] shown as a grid, or a matplotlib Figure


@dataclass(frozen=True)
class DataSpec:
    """What a family may know about its data, read from the shard manifest."""

    dataset: str
    kind: str  # "image" or "points"
    shape: tuple[int, ...]  # one sample: (C, H, W) for images, (D,) for points
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    samples: Mapping[str, int] = field(default_factory=dict)  # per split
    # Extra per-sample fields beside "x"/"y": name -> {"kind": "png"|"npy"|"json", "shape": [...]},
    # e.g. "embeddings" (10, 1024) text embeddings, "captions" (a list of strings), "hires" images.
    fields: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # How the text fields were embedded: {"name": "char_cnn_rnn"|"hashing"|"sentence", ...options}; {} if none.
    text_encoder: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what checkpoints store, so a run samples without its shards)."""
        return {"dataset": self.dataset, "kind": self.kind, "shape": list(self.shape),
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "samples": dict(self.samples), "fields": {k: dict(v) for k, v in self.fields.items()},
                "text_encoder": dict(self.text_encoder)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """From ``to_dict``'s output, a shard manifest's fields, or an older checkpoint's (optional keys
        default)."""
        return cls(dataset=d["dataset"], kind=d["kind"], shape=tuple(d["shape"]),
                   num_classes=d.get("num_classes", 0), class_names=tuple(d.get("class_names", ())),
                   samples=dict(d.get("samples", {})), fields=dict(d.get("fields", {})),
                   text_encoder=dict(d.get("text_encoder", {})))

    @property
    def channels(self) -> int:
        return self.shape[0] if self.kind == "image" else 1

    @property
    def image_size(self) -> int:
        return self.shape[-1]

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Player:
    """One optimizer and the networks it updates."""

    name: str
    networks: tuple[str, ...]
    steps: int = 1  # consecutive steps per iteration (a critic's n_critic)
    consumes_data: bool = True  # draw a fresh batch for each step; False reuses the last one


class Networks(Mapping[str, nn.Module]):
    """Name -> module view handed to the family.

    During a player's step its own networks are the trainable (possibly DDP-wrapped) modules and
    every other network is the bare module with gradients off. ``ema(name)`` gives the exponential
    moving average copy when the job keeps one, else the module itself.
    """

    def __init__(self, modules: Mapping[str, nn.Module], ema: Mapping[str, nn.Module] | None = None):
        self._modules = dict(modules)
        self._ema = dict(ema or {})

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def ema(self, name: str) -> nn.Module:
        return self._ema.get(name, self._modules[name])

    def bare(self, name: str) -> nn.Module:
        """The network itself, unwrapped from DistributedDataParallel: for methods other than forward
        (a flow's inverse, a network's own helpers). Its forward skips DDP's gradient hooks."""
        module = self._modules[name]
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@runtime_checkable
class Family(Protocol):
    """The contract every generative family implements (see the module docstring)."""

    name: ClassVar[str]
    config_class: ClassVar[type]  # dataclass for the job's `model:` section
    flavors: ClassVar[Mapping[str, Mapping[str, Any]]]  # flavor -> defaults for `model:`
    debug_dataset: ClassVar[str]  # the embedded shard set its debug flavor is tested on
    held_out_conditions: ClassVar[int]  # eval-split samples handed to set_conditions; 0: none
    condition_fields: ClassVar[frozenset[str]]  # the extra batch fields set_conditions reads (e.g. captions)
    sampling_needs_gradients: ClassVar[bool]  # sample() differentiates (Langevin dynamics, score models)
    initializes_from_data: ClassVar[bool]  # initialize() reads the first training batch (Glow's ActNorm)
    paper_parameters: ClassVar[Mapping[str, str]]  # flavor -> the paper's parameter count (gensuite summary)

    cfg: Any  # the job's model section, as config_class
    data: DataSpec
    # Whether the terms of the step now taken will be logged (the trainer sets it before each step; True
    # outside training steps): loss() may leave out terms that are only logged when it is False.
    log_step: bool

    def __init__(self, cfg: Any, data: DataSpec) -> None: ...

    @classmethod
    def complete_config(cls, cfg: Any) -> Any:
        """The model settings with whatever the family copies from other runs filled in (StackGAN
        Stage II: its Stage-I generator's settings), before the run's ``config.yaml`` is written, so a
        checkpoint rebuilds alone; a ``ConfigError`` when such a run is missing."""

    @property
    def conditional(self) -> bool:
        """Samples are drawn for given class labels (``fixed_inputs`` puts them under "y")."""

    def build_networks(self) -> dict[str, nn.Module]:
        """Fresh networks, initialised from the current torch RNG."""

    def players(self) -> list[Player]:
        """Optimisation order within one training iteration."""

    def loss(self, player: str, nets: Networks, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Scalar loss terms for ``player``; key ``"loss"`` is the one that is backpropagated."""

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fixed noise (and labels) drawn once per run so sample grids are comparable over time."""

    def sample(self, nets: Networks, fixed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Samples for the given fixed inputs: images in [0, 1] or points."""

    def visuals(self, nets: Networks, fixed: dict[str, torch.Tensor], reference: Batch) -> dict[str, Visual]:
        """Images and figures to log; ``reference`` is a fixed batch of held-out data."""

    def grid_nrow(self, n: int) -> int:
        """Images per row when ``n`` samples are shown as a grid (e.g. one row per class)."""

    def frozen_networks(self) -> dict[str, str | tuple[str, str]]:
        """Networks loaded from another run and never trained: name -> run dir or checkpoint, or
        (run dir or checkpoint, the network's name there)."""

    def set_conditions(self, held_out: Batch) -> None:
        """Held-out conditions (e.g. test captions and their embeddings) to draw fixed inputs from."""

    def state_dict(self) -> dict[str, Any]:
        """Extra training state to checkpoint (e.g. an EBM replay buffer); tensors and plain data."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # -- hooks: each has a default that does nothing (GenerativeFamily) -------------------------------
    def initialize(self, nets: Networks, batch: Batch) -> None:
        """Data-dependent initialisation (Glow's ActNorm) before the first step, from the first
        ``train.batch_size`` training samples in stored order (the same batch on every rank, so every
        rank initialises alike); a resumed run then loads its checkpoint over it. Called only when
        ``initializes_from_data`` is set."""

    def after_step(self, player: str, nets: Networks, step: int) -> None:
        """After each optimiser step of ``player``, without gradients (WGAN's weight clipping)."""

    def rank_state_dict(self) -> dict[str, Any]:
        """State that differs per rank (an EBM's replay buffer): every rank's is checkpointed."""

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's state from ``rank_state_dict``, on a resume with the same rank count."""

    def validation_terms(self, nets: Networks, batch: Batch, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """{player: its loss terms, detached} on a held-out batch: the validation curves beside the
        training ones (``val/<player>/<term>``). Called with the raw networks in eval mode, their
        parameters frozen, and the torch RNG seeded for this step and batch (restored afterwards); it must
        leave every piece of training state (replay buffers, their generators) as it found it, which the
        default does by restoring ``state_dict`` and ``rank_state_dict`` after calling ``loss``."""

    def loss_needs_gradients(self, player: str) -> bool:
        """``loss(player, ...)`` differentiates inside (a gradient penalty on D's input, unrolled
        look-ahead steps), so the default ``validation_terms`` runs it with autograd on."""


# -- declared abilities: optional parts of the contract, tested with isinstance ------------------


@runtime_checkable
class Classifies(Protocol):
    """Predicts class logits; its penultimate features judge other runs (classification metric,
    classifier FID, conditional accuracy)."""

    def predict(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits."""

    def features(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        """(N, F) features the logits are computed from."""


@runtime_checkable
class HasLikelihood(Protocol):
    """log p(x) in nats per sample, exact or as named bounds (the likelihood metric logs each, and
    each in bits/dim as ``<name>_bpd``): a flow's exact log-likelihood, a VAE's ELBO and IWAE, a
    diffusion model's variational bound."""

    likelihood_values: ClassVar[tuple[str, ...]]  # e.g. ("elbo", "iwae"); higher is better

    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample values (N,) in nats. Any noise for sample i comes from ``per_sample_normal``
        with ``seeds[i]``, so a value depends neither on its batch nor on the rank computing it;
        ``k``: importance samples (or Monte-Carlo draws) per data point where the bound takes them."""


@runtime_checkable
class TextConditioned(Protocol):
    """Draws images for text embeddings (``gensuite sample --text``)."""

    def with_text(self, fixed: dict[str, torch.Tensor], embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """``fixed`` inputs that draw every sample for the (1, T) text ``embedding``."""


@dataclass(frozen=True)
class SamplerChoice:
    """Which of a family's samplers draws, with how many steps and how much noise (None: keep)."""

    name: str | None = None
    steps: int | None = None  # 0: the model's full number of steps
    eta: float | None = None  # DDIM's η: 0 deterministic, 1 ancestral

    @classmethod
    def given(cls, name: str | None, steps: int | None, eta: float | None) -> SamplerChoice | None:
        """The choice these optional settings make, or None when none is set."""
        return None if (name, steps, eta) == (None, None, None) else cls(name, steps, eta)

    def describe(self) -> str:
        if self.name == "ddim":
            return f"ddim, {self.steps or 'all'} steps, η={self.eta:g}"
        return f"{self.name}"

    def describe_short(self) -> str:
        """For file names: ddim50-eta0, ddpm."""
        return f"ddim{self.steps or 'all'}-eta{self.eta:g}" if self.name == "ddim" else f"{self.name}"


@runtime_checkable
class HasSamplers(Protocol):
    """Several samplers, chosen at sampling time (``gensuite sample --sampler NAME --steps S --eta E``,
    ``eval.sampler``): a diffusion model's DDPM, DDIM and Langevin samplers."""

    samplers: tuple[str, ...]  # the names this model accepts
    sampler: SamplerChoice  # the one in use

    def use_sampler(self, choice: SamplerChoice) -> None:
        """Draw with ``choice`` from now on (a one-line error when the model cannot)."""


def per_sample_normal(seeds: torch.Tensor, *shape: int) -> torch.Tensor:
    """(len(seeds), *shape) standard normals, row i from its own generator seeded with seeds[i]."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class GenerativeFamily:
    """Defaults for the optional parts of the contract: one player owning every network, no
    frozen networks, no extra state, prior samples as the only visual."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    flavors: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    debug_dataset: ClassVar[str] = "digits"
    held_out_conditions: ClassVar[int] = 0
    condition_fields: ClassVar[frozenset[str]] = frozenset()
    sampling_needs_gradients: ClassVar[bool] = False
    initializes_from_data: ClassVar[bool] = False
    paper_parameters: ClassVar[Mapping[str, str]] = {}
    log_step: bool = True

    def __init__(self, cfg: Any, data: DataSpec) -> None:
        self.cfg = cfg
        self.data = data
        self._network_names: tuple[str, ...] = ()

    @classmethod
    def complete_config(cls, cfg: Any) -> Any:
        return cfg

    @property
    def conditional(self) -> bool:
        """Samples are drawn for given class labels (``fixed_inputs`` puts them under "y")."""
        return False

    def players(self) -> list[Player]:
        return [Player("model", self.network_names())]

    def network_names(self) -> tuple[str, ...]:
        if not self._network_names:
            with torch.device("meta"):
                self._network_names = tuple(self.build_networks())
        return self._network_names

    def visuals(self, nets: Networks, fixed: dict[str, torch.Tensor], reference: Batch) -> dict[str, Visual]:
        return {"samples": self.sample(nets, fixed)}

    def grid_nrow(self, n: int) -> int:
        if self.conditional:  # one row per class (fixed_labels)
            return max(1, n // self.data.num_classes)
        return max(1, round(n ** 0.5))

    def fixed_labels(self, n: int) -> torch.Tensor:
        """Labels for ``n`` fixed inputs: class-conditional families draw n // classes of each class
        in order (one grid row per class), the others zeros."""
        if self.conditional:
            return torch.arange(self.data.num_classes).repeat_interleave(max(1, n // self.data.num_classes))
        return torch.zeros(n, dtype=torch.long)

    def frozen_networks(self) -> dict[str, str | tuple[str, str]]:
        return {}

    def set_conditions(self, held_out: Batch) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected extra state keys {sorted(state)}")

    def initialize(self, nets: Networks, batch: Batch) -> None:
        pass

    def after_step(self, player: str, nets: Networks, step: int) -> None:
        pass

    def rank_state_dict(self) -> dict[str, Any]:
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected per-rank state keys {sorted(state)}")

    def validation_terms(self, nets: Networks, batch: Batch, step: int) -> dict[str, dict[str, torch.Tensor]]:
        # ``loss`` itself, once per player: the same objective (and the same step-dependent weights,
        # e.g. KL annealing) as the training curve, so the two are comparable. Without autograd unless
        # the loss differentiates inside; with it, no graph reaches the (frozen) parameters either. A
        # loss may change the family's own state (a counter, a record of its draws): what checkpoints
        # hold of it is put back afterwards, so training and a resume continue as without validation.
        # (A family whose state is large, an EBM's replay buffer, overrides this to only read it.)
        shared, own = copy.deepcopy(self.state_dict()), copy.deepcopy(self.rank_state_dict())
        out = {}
        try:
            for player in self.players():
                with torch.enable_grad() if self.loss_needs_gradients(player.name) else torch.no_grad():
                    terms = self.loss(player.name, nets, batch, step)
                out[player.name] = {k: v.detach() for k, v in terms.items()}
        finally:
            self.load_state_dict(shared)
            self.load_rank_state_dict(own)
        return out

    def loss_needs_gradients(self, player: str) -> bool:
        return False


def sampling_mode(family: Family):
    """The autograd mode ``family.sample`` runs in: gradients on for samplers that differentiate."""
    return torch.enable_grad() if family.sampling_needs_gradients else torch.no_grad()


_FAMILIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a family available to jobs under ``cls.name``."""
    if not cls.name or cls.name in _FAMILIES:
        raise ValueError(f"family name {cls.name!r} is empty or already registered")
    if not dataclasses.is_dataclass(cls.config_class):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass")
    _FAMILIES[cls.name] = cls
    return cls


def families() -> dict[str, type]:
    import gensuite.families  # noqa: F401  (registers the built-in families)

    return dict(_FAMILIES)


ENTRY_POINT_GROUP = "gensuite.families"


def installed_families() -> dict[str, str]:
    """Families that installed packages declare in the ``gensuite.families`` entry-point group:
    name -> ``module.path:ClassName`` (not imported until a job names one)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_family(name: str) -> type:
    """A registered family, an installed package's (entry point ``gensuite.families``), or
    ``module.path:ClassName`` of a family outside gensuite (imported on first use; the class needs
    the contract's attributes, e.g. by subclassing GenerativeFamily)."""
    known = families()
    if name in known:
        return known[name]
    installed = installed_families()
    cls = import_family(installed[name], f"entry point {name}") if name in installed else import_family(name)
    _FAMILIES[name] = cls
    return cls


def complete_job(job, inputs_required: bool = True):
    """The job with the model settings its family copies from other runs (``complete_config``); with
    ``inputs_required`` off, a missing run leaves them as they are (``gensuite summary`` before Stage I)."""
    from gensuite.errors import ConfigError

    try:
        return dataclasses.replace(job, model=get_family(job.family).complete_config(job.model))
    except ConfigError:
        if inputs_required:
            raise
        return job


def import_family(spec: str, declared_by: str = "") -> type:
    """``module.path:ClassName`` -> the class, or a one-line error naming what is missing."""
    import importlib

    from gensuite.errors import ConfigError

    module_name, _, class_name = spec.partition(":")
    if declared_by:  # an installed package's entry point: say which, so the user knows what to reinstall
        spec = f"{spec} ({declared_by} of group {ENTRY_POINT_GROUP})"
    if not module_name or not class_name:
        raise ConfigError("family", f"{spec!r}: a family outside gensuite is named module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("family", f"{spec!r}: cannot import {module_name} ({e}); put its folder on PYTHONPATH or "
                                    f"pip install it") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError("family", f"{spec!r}: {module_name} has no {class_name}")
    missing = [a for a in ("config_class", "flavors", "build_networks", "players", "loss", "sample")
               if a not in dir(cls)]
    if missing or not dataclasses.is_dataclass(cls.config_class):
        lacks = ", ".join(missing) or "a dataclass config_class"
        raise ConfigError("family", f"{spec!r}: not a gensuite family (it lacks {lacks}; subclass "
                                    f"gensuite.registry.GenerativeFamily)")
    return cls
