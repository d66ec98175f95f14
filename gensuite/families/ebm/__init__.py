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
with ``sampling_needs_gradients``. Pixels are modelled in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError
from gensuite.families.ebm.figures import chain_strip, energy_histogram
from gensuite.families.ebm.networks import EnergyNet
from gensuite.families.ebm.objectives import contrastive_divergence, energy_from_logits
from gensuite.families.ebm.samplers import ReplayBuffer, sgld
from gensuite.registry import Batch, GenerativeFamily, Networks, register

BOUNDS = (-1.0, 1.0)  # the model's pixel range; chains are clamped to it and restart uniform over it
CHAINS_SHOWN = 8  # rows of the chain strip


@dataclass
class EBMConfig:
    energy: Literal["scalar", "jem"] = "scalar"  # scalar: E = f(x); jem: E = −logsumexp(logits) + cross-entropy
    # the network
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
    }
    debug_dataset = "digits"
    sampling_needs_gradients = True  # sample() runs Langevin dynamics on ∇ₓE

    def __init__(self, cfg: EBMConfig, data):
        super().__init__(cfg, data)
        if data.kind != "image":
            raise ConfigError("data.dataset", f"the energy network is convolutional; {data.dataset} holds "
                                              f"{data.kind} (use digits, mnist or cifar10)")
        if cfg.energy == "jem" and data.num_classes < 2:
            raise ConfigError("model.energy", f"jem needs class labels; {data.dataset} has none (use scalar)")
        self.buffer = ReplayBuffer(cfg.buffer_size, data.shape, cfg.reinit_prob, BOUNDS) if cfg.buffer_size else None

    def build_networks(self):
        c = self.cfg
        outputs = self.data.num_classes if c.energy == "jem" else 1
        return {"energy": EnergyNet(self.data.channels, self.data.image_size, c.width, c.levels, c.hidden,
                                    outputs, c.activation, c.spectral_norm)}

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
        return sgld(lambda v: self.energy(net, v), x, steps, c.step_size, c.noise_std, c.grad_clip, BOUNDS,
                    generator, progress)

    # -- training ----------------------------------------------------------------------------------
    def chain_starts(self, n: int, device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(buffer indices or None, starting points) for ``n`` training chains."""
        if self.buffer is None:
            return None, torch.rand(n, *self.data.shape, device=device) * (BOUNDS[1] - BOUNDS[0]) + BOUNDS[0]
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
            return None, torch.rand(n, *self.data.shape, device=device) * (BOUNDS[1] - BOUNDS[0]) + BOUNDS[0]
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
        x_pos = batch["x"] * 2 - 1
        if c.data_noise:
            x_pos = (x_pos + c.data_noise * torch.randn_like(x_pos)).clamp(*BOUNDS)
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
    def fixed_inputs(self, n: int, generator: torch.Generator):
        low, high = BOUNDS
        return {"x_start": torch.rand(n, *self.data.shape, generator=generator) * (high - low) + low,
                "seed": torch.randint(0, 2**62, (1,), generator=generator).expand(n)}

    @property
    def sample_steps(self) -> int:
        return self.cfg.sample_steps or self.cfg.langevin_steps

    def draw(self, nets: Networks, fixed, progress=None) -> torch.Tensor:
        """Chain ends in [-1, 1]; the chains' noise comes from ``fixed["seed"]``, so the same inputs give
        the same samples."""
        x = fixed["x_start"]
        generator = torch.Generator(device=x.device).manual_seed(int(fixed["seed"][0]))
        return self.langevin(nets.ema("energy"), x, self.sample_steps, generator, progress)

    def sample(self, nets: Networks, fixed):
        return ((self.draw(nets, fixed) + 1) / 2).clamp(0, 1)

    def visuals(self, nets: Networks, fixed, reference: Batch):
        shown = min(CHAINS_SHOWN, len(fixed["x_start"]))
        every = max(1, self.sample_steps // self.cfg.chain_frames)
        frames = [fixed["x_start"][:shown]]

        def record(k: int, x: torch.Tensor) -> None:
            if k % every == 0 or k == self.sample_steps:
                frames.append(x[:shown].detach())

        final = self.draw(nets, fixed, record)
        out = {"samples": ((final + 1) / 2).clamp(0, 1),
               "chains": chain_strip([((f + 1) / 2).clamp(0, 1) for f in frames])}
        net = nets.ema("energy")
        with torch.no_grad():  # only energies from here on
            energies = {}
            if "x" in reference:
                energies["data"] = self.energy(net, reference["x"] * 2 - 1)
            if self.buffer is not None and self.buffer.started:
                in_buffer = self.buffer.samples[: len(final)].to(final.device)
                out["buffer"] = ((in_buffer + 1) / 2).clamp(0, 1)
                energies["buffer"] = self.energy(net, in_buffer)
            energies["chains from noise"] = self.energy(net, final)
            energies["uniform noise"] = self.energy(net, fixed["x_start"])
        out["energies"] = energy_histogram(energies, f"energies of {len(final)} chains after {self.sample_steps} "
                                                     f"steps; data low, noise high", apart=("uniform noise",))
        return out
