"""Energy-based models (assignment 003 P2, P3): p(x) = exp(−E(x)) / Z with a convolutional energy,
trained by contrastive divergence on negatives from stochastic-gradient Langevin dynamics (SGLD) that
start from a persistent replay buffer (Du & Mordatch 2019, "IGEBM"), or as a classifier whose logits
define p(x, y) (Grathwohl et al. 2020, "JEM").

One network, ``energy`` (``networks.EnergyNet``). ``loss`` draws a batch of chain starts from the
replay buffer (a share restarted from uniform noise), runs ``langevin_steps`` of SGLD on the network
itself, writes the chain ends back, and minimises E(x⁺) − E(x⁻) + α (E(x⁺)² + E(x⁻)²)
(``objectives.py``). The buffer differs per rank and lives in ``rank_state_dict`` with its own
generator, so a resumed run continues bit for bit. Samples (grids, ``gensuite sample``, evaluation)
are fresh chains from uniform noise: the sampler differentiates the energy, which the family declares
with ``sampling_needs_gradients``. Pixels are modelled in [-1, 1]. 2-D points (the ``points`` flavor)
have an MLP energy, and their chains live in the data's bounding box widened by a quarter of its side
(read from the first training batch by ``initialize`` and kept in the checkpoint), where [-1, 1] holds
the pixels: the buffer starts uniform over it, restarts draw from it and the chains are clamped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.ebm.figures import chain_strip, energy_histogram
from gensuite.families.ebm.networks import EnergyMLP, EnergyNet
from gensuite.families.ebm.objectives import contrastive_divergence, energy_from_logits
from gensuite.families.ebm.samplers import ReplayBuffer, sgld
from gensuite.figures import density_and_samples, grid_mass, grid_points, scatter_strip
from gensuite.registry import Batch, GenerativeFamily, Networks, register

BOUNDS = (-1.0, 1.0)  # the model's pixel range; chains are clamped to it and restart uniform over it
BOX_MARGIN = 0.25  # points: the chains' box is the data's widened by this share of its side on each side
CHAINS_SHOWN = 8  # rows of the chain strip


@dataclass
class EBMConfig:
    energy: Literal["scalar", "jem"] = "scalar"  # scalar: E = f(x); jem: E = −logsumexp(logits) + cross-entropy
    architecture: Literal["conv", "mlp"] = "conv"  # conv: images; mlp: points
    mlp_hidden: list[int] = field(default_factory=lambda: [128, 128, 128])  # mlp: the energy's widths
    # the conv network
    width: int = 32  # channels of the stem; each of the `levels` stride-2 convolutions doubles them (≤ 8×)
    levels: int = 3
    hidden: int = 128  # the MLP head's hidden units
    activation: Literal["swish", "leaky_relu"] = "swish"
    spectral_norm: bool = False  # every layer's weight divided by its largest singular value (IGEBM)
    # training chains: x ← clamp(x − (step_size/2)·clip(∇E) + noise·ξ), langevin_steps times
    langevin_steps: int = 60
    step_size: float = 10.0  # ε
    noise: Optional[float] = 0.005  # s; null: √ε, the Langevin discretisation proper
    grad_clip: Optional[float] = None  # clamp each element of ∇ₓE to [-grad_clip, grad_clip]; null: no clip
    buffer_size: int = 10000  # persistent chain ends per rank; 0: every chain starts from noise (short-run)
    reinit_prob: float = 0.05  # share of chains restarted from U(-1, 1) each step
    # the loss
    alpha: float = 0.1  # weight of the energy² regulariser
    ce_weight: float = 1.0  # jem: weight of the cross-entropy on labelled data
    data_noise: float = 0.0  # std of Gaussian noise added to real images (smooths the data's energy)
    # chains from noise: grids, `gensuite sample`, evaluation
    sample_steps: int = 0  # 0: langevin_steps
    chain_frames: int = 10  # columns of the chain strip: every (sample_steps / chain_frames)-th state

    def __post_init__(self):
        for name in ("width", "levels", "hidden", "langevin_steps", "chain_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be >= 1")
        if not self.mlp_hidden or min(self.mlp_hidden) < 1:
            raise ConfigError("model.mlp_hidden", "needs at least one layer, each width >= 1")
        if self.buffer_size < 0:
            raise ConfigError("model.buffer_size", "must be >= 0 (0: every chain starts from noise)")
        if self.sample_steps < 0:
            raise ConfigError("model.sample_steps", "must be >= 0 (0: langevin_steps)")
        if not self.step_size > 0:
            raise ConfigError("model.step_size", "must be > 0")
        if self.noise is not None and self.noise < 0:
            raise ConfigError("model.noise", "must be >= 0, or null for sqrt(step_size)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError("model.grad_clip", "must be > 0, or null for no clipping")
        if not 0 <= self.reinit_prob <= 1:
            raise ConfigError("model.reinit_prob", "must be in [0, 1]")
        for name in ("alpha", "ce_weight", "data_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}", "must be >= 0")

    @property
    def noise_std(self) -> float:
        return self.step_size ** 0.5 if self.noise is None else self.noise


@register
class EnergyBasedModel(GenerativeFamily):
    name = "ebm"
    config_class = EBMConfig
    flavors = {
        # IGEBM's sampler and buffer (Du & Mordatch 2019): 60 steps of size 10, noise 0.005, a buffer of
        # 10,000 with 5% restarts from noise, spectral normalisation; on this family's small conv net.
        "igebm": {"energy": "scalar", "spectral_norm": True, "activation": "swish", "langevin_steps": 60,
                  "step_size": 10.0, "noise": 0.005, "buffer_size": 10000, "reinit_prob": 0.05, "alpha": 1.0},
        # JEM's sampler (Grathwohl et al. 2020): 20 steps of size 1, noise 0.01, 5% restarts from U(-1, 1);
        # the energy is −logsumexp of class logits, trained with the cross-entropy on labels beside it.
        "jem": {"energy": "jem", "spectral_norm": False, "activation": "swish", "langevin_steps": 20,
                "step_size": 1.0, "noise": 0.01, "buffer_size": 10000, "reinit_prob": 0.05, "alpha": 0.0,
                "ce_weight": 1.0},
        # CPU-sized for 32x32 digits (jobs/ebm_digits.yaml; docs/families/ebm.md).
        "small": {"energy": "scalar", "width": 16, "levels": 3, "hidden": 64, "activation": "swish",
                  "spectral_norm": False, "langevin_steps": 30, "step_size": 20.0, "noise": 0.005,
                  "grad_clip": 0.03, "buffer_size": 2000, "reinit_prob": 0.05, "alpha": 0.1,
                  "data_noise": 0.005, "sample_steps": 256},
        # GPU-sized for 28 or 32 px MNIST (jobs/ebm_mnist.yaml): the same recipe, twice the width, 60 steps.
        "mnist": {"energy": "scalar", "width": 32, "levels": 3, "hidden": 128, "activation": "swish",
                  "spectral_norm": False, "langevin_steps": 60, "step_size": 20.0, "noise": 0.005,
                  "grad_clip": 0.03, "buffer_size": 10000, "reinit_prob": 0.05, "alpha": 0.1,
                  "data_noise": 0.005, "sample_steps": 256},
        "debug": {"width": 8, "levels": 2, "hidden": 16, "langevin_steps": 3, "buffer_size": 64,
                  "sample_steps": 4, "chain_frames": 2, "grad_clip": 0.03},
        # 2-D points (moons, ring, grid; jobs/ebm_moons.yaml): a 3x128 swish MLP energy; short persistent
        # chains with steps sized to the data's scale (a move of a few hundredths per step) and noise well
        # below √ε, as the image recipes; longer chains from the box for samples.
        "points": {"architecture": "mlp", "mlp_hidden": [128, 128, 128], "activation": "swish",
                   "langevin_steps": 40, "step_size": 0.01, "noise": 0.01, "buffer_size": 10000,
                   "reinit_prob": 0.05, "alpha": 0.1, "sample_steps": 200},
    }
    debug_dataset = "digits"
    sampling_needs_gradients = True  # sample() runs Langevin dynamics on ∇ₓE

    def __init__(self, cfg: EBMConfig, data):
        super().__init__(cfg, data)
        self.image = data.kind == "image"
        if cfg.architecture == "conv" and not self.image:
            raise ConfigError("data.dataset", f"the energy network is convolutional; {data.dataset} holds "
                                              f"{data.kind} (use flavor: points, or digits, mnist or cifar10)")
        if cfg.architecture == "mlp" and self.image:
            raise ConfigError("model.architecture", f"the mlp energy is for points; {data.dataset} holds images "
                                                    f"(use conv)")
        if cfg.energy == "jem" and data.num_classes < 2:
            raise ConfigError("model.energy", f"jem needs class labels; {data.dataset} has none (use scalar)")
        # (low, high) of the chains: pixels' [-1, 1], or for points the box set by initialize or a checkpoint.
        self.bounds: Optional[tuple] = BOUNDS if self.image else None
        self.initializes_from_data = not self.image
        self.buffer = (ReplayBuffer(cfg.buffer_size, data.shape, cfg.reinit_prob, self.bounds)
                       if cfg.buffer_size else None)

    def build_networks(self):
        c = self.cfg
        outputs = self.data.num_classes if c.energy == "jem" else 1
        if c.architecture == "mlp":
            return {"energy": EnergyMLP(self.data.dim, c.mlp_hidden, outputs, c.activation, c.spectral_norm)}
        return {"energy": EnergyNet(self.data.channels, self.data.image_size, c.width, c.levels, c.hidden,
                                    outputs, c.activation, c.spectral_norm)}

    # -- the chains' box (points) ------------------------------------------------------------------------
    def initialize(self, nets: Networks, batch: Batch) -> None:
        """Points: the box of the first training batch, widened by BOX_MARGIN of its side each way."""
        x = batch["x"].float().cpu()
        low, high = x.min(0).values, x.max(0).values
        margin = BOX_MARGIN * (high - low)
        self.set_bounds(low - margin, high + margin)

    def set_bounds(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.bounds = (low, high)
        if self.buffer is not None:
            self.buffer.bounds = self.bounds

    def state_dict(self):
        return {} if self.image else {"bounds": torch.stack(self.bounds)}

    def load_state_dict(self, state):
        if self.image:
            super().load_state_dict(state)
        else:
            self.set_bounds(*state["bounds"].unbind(0))

    def chain_bounds(self, device) -> tuple:
        if self.bounds is None:
            raise GensuiteError("ebm: the points' box is set from the first training batch (initialize) or a "
                                "checkpoint; neither has been given")
        return tuple(b.to(device) if isinstance(b, torch.Tensor) else b for b in self.bounds)

    def uniform(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` points uniform over the chains' box (pixels: [-1, 1])."""
        low, high = self.chain_bounds(device)
        u = torch.rand(n, *self.data.shape, generator=generator).to(device)
        return u * (high - low) + low

    # -- the energy --------------------------------------------------------------------------------
    def energy_and_logits(self, net, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = net(x)
        if self.cfg.energy == "jem":
            return energy_from_logits(out), out
        return out.squeeze(1), None

    def energy(self, net, x: torch.Tensor) -> torch.Tensor:
        """E(x) per sample (N,), x in the model's [-1, 1]."""
        return self.energy_and_logits(net, x)[0]

    def langevin(self, net, x: torch.Tensor, steps: int, generator=None, progress=None) -> torch.Tensor:
        c = self.cfg
        return sgld(lambda v: self.energy(net, v), x, steps, c.step_size, c.noise_std, c.grad_clip,
                    self.chain_bounds(x.device), generator, progress)

    # -- training ----------------------------------------------------------------------------------
    def chain_starts(self, n: int, device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(buffer indices or None, starting points) for ``n`` training chains."""
        if self.buffer is None:
            return None, self.uniform(n, device)
        if not self.buffer.started:
            # The loop seeds the torch RNG with train.seed and the rank: each rank's buffer gets its own
            # reproducible seed, and from then on only the buffer's own (checkpointed) generator is used.
            self.buffer.start(int(torch.randint(0, 2**62, (1,))))
        index, start = self.buffer.draw(n)
        return index, start.to(device)

    def held_out_chain_starts(self, n: int, device) -> tuple[None, torch.Tensor]:
        """Starting points for validation chains, from the torch RNG: a read-only draw of the replay
        buffer (``ReplayBuffer.peek``), or uniform noise when there is none yet; nothing is written back."""
        if self.buffer is None or not self.buffer.started:
            return None, self.uniform(n, device)
        return None, self.buffer.peek(n).to(device)

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        return self.contrastive_terms(nets, batch, self.chain_starts)

    def validation_terms(self, nets: Networks, batch: Batch, step: int):
        # The training objective on held-out positives, against negatives from the same sampler (chains
        # from the buffer as it stands), but the buffer is only read: its entries and its generator stay
        # as training left them. The chains need ∇ₓE, so autograd stays on (the parameters are frozen).
        with torch.enable_grad():
            terms = self.contrastive_terms(nets, batch, self.held_out_chain_starts)
        return {self.players()[0].name: {k: v.detach() for k, v in terms.items()}}

    def contrastive_terms(self, nets: Networks, batch: Batch, starts) -> dict[str, torch.Tensor]:
        """The loss terms with negatives from chains started at ``starts(n, device)`` -> (buffer indices
        the chain ends are written back to, or None; starting points)."""
        c = self.cfg
        x_pos = self.to_model_space(batch["x"])
        if c.data_noise:
            x_pos = (x_pos + c.data_noise * torch.randn_like(x_pos)).clamp(*self.chain_bounds(x_pos.device))
        index, start = starts(len(x_pos), x_pos.device)
        # The chains differentiate the bare network (not DDP's wrapper): only ∇ₓ, no parameter gradients.
        x_neg = self.langevin(nets.bare("energy"), start, c.langevin_steps)
        if index is not None:
            self.buffer.store(index, x_neg)
        # One forward of the trained network for both batches: one backward per DDP step.
        energies, logits = self.energy_and_logits(nets["energy"], torch.cat([x_pos, x_neg]))
        e_pos, e_neg = energies.split([len(x_pos), len(x_neg)])
        terms = contrastive_divergence(e_pos, e_neg, c.alpha)
        if c.energy == "jem":
            y = batch["y"]
            logits_pos = logits[: len(x_pos)]
            terms["ce"] = F.cross_entropy(logits_pos, y)
            terms["accuracy"] = (logits_pos.argmax(1) == y).float().mean()
            terms["loss"] = terms["loss"] + c.ce_weight * terms["ce"]
        return terms

    # -- per-rank state: the replay buffer -----------------------------------------------------------
    def rank_state_dict(self):
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else {}

    def load_rank_state_dict(self, state):
        if self.buffer is not None:
            self.buffer.load_state_dict(state.get("buffer", {}))
        elif state:
            super().load_rank_state_dict(state)

    # -- sampling: fresh chains from noise -------------------------------------------------------------
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels from [0, 1] to the model's [-1, 1]; points as they are."""
        return x * 2 - 1 if self.image else x

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1) if self.image else x

    def fixed_inputs(self, n: int, generator: torch.Generator):
        # Uniform on [0, 1)^shape, stretched over the chains' box when drawn: the box of points may be set
        # (initialize, a checkpoint) after these inputs are.
        return {"u_start": torch.rand(n, *self.data.shape, generator=generator),
                "seed": torch.randint(0, 2**62, (1,), generator=generator).expand(n)}

    def chain_start(self, fixed) -> torch.Tensor:
        u = fixed["u_start"]
        low, high = self.chain_bounds(u.device)
        return u * (high - low) + low

    @property
    def sample_steps(self) -> int:
        return self.cfg.sample_steps or self.cfg.langevin_steps

    def draw(self, nets: Networks, fixed, progress=None) -> torch.Tensor:
        """Chain ends in the model's space; the chains' noise comes from ``fixed["seed"]``, so the same
        inputs give the same samples."""
        x = self.chain_start(fixed)
        generator = torch.Generator(device=x.device).manual_seed(int(fixed["seed"][0]))
        return self.langevin(nets.ema("energy"), x, self.sample_steps, generator, progress)

    def sample(self, nets: Networks, fixed):
        return self.to_data_space(self.draw(nets, fixed))

    def visuals(self, nets: Networks, fixed, reference: Batch):
        start = self.chain_start(fixed)
        shown = min(CHAINS_SHOWN, len(start)) if self.image else len(start)  # points: each chain is a dot
        every = max(1, self.sample_steps // self.cfg.chain_frames)
        frames = [start[:shown]]

        def record(k: int, x: torch.Tensor) -> None:
            if k % every == 0 or k == self.sample_steps:
                frames.append(x[:shown].detach())

        final = self.draw(nets, fixed, record)
        out = {"samples": self.to_data_space(final)}
        net = nets.ema("energy")
        if self.image:
            out["chains"] = chain_strip([self.to_data_space(f) for f in frames])
        else:
            steps = [every * k for k in range(len(frames) - 1)] + [self.sample_steps]
            out["chains"] = scatter_strip(frames, [f"step {k}" for k in steps], "Langevin chains from the box")
            out["density"] = self.density_figure(net, final, reference["x"])
        with torch.no_grad():  # only energies from here on
            energies = {}
            if "x" in reference:
                energies["data"] = self.energy(net, self.to_model_space(reference["x"]))
            if self.buffer is not None and self.buffer.started:
                in_buffer = self.buffer.samples[: len(final)].to(final.device)
                out["buffer"] = self.to_data_space(in_buffer)
                energies["buffer"] = self.energy(net, in_buffer)
            energies["chains from noise"] = self.energy(net, final)
            energies["uniform noise"] = self.energy(net, start)
        out["energies"] = energy_histogram(energies, f"energies of {len(final)} chains after {self.sample_steps} "
                                                     f"steps; data low, noise high", apart=("uniform noise",))
        return out

    @torch.no_grad()
    def density_figure(self, net, samples: torch.Tensor, data: torch.Tensor, n: int = 96):
        """exp(−E) normalised over a square around the chains' box (the grid's mass is 1 by construction)
        beside the samples over the data: where the energy puts the mass, and where the chains end."""
        low, high = self.chain_bounds(samples.device)
        lo, hi = float(low.min()), float(high.max())
        points = grid_points(lo, hi, n).to(samples.device)
        cell = ((hi - lo) / n) ** 2
        log_density = (-self.energy(net, points)).log_softmax(0).view(n, n) - math.log(cell)
        return density_and_samples(log_density, lo, hi, samples, data, grid_mass(log_density, lo, hi))
