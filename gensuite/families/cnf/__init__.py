"""Continuous normalising flows: FFJORD (Grathwohl et al. 2019) on points and images, with RNODE's
regularisers (Finlay et al. 2020), and the course exercise's tanh dynamics with a learnable θ
(assignment 003 P1b).

One network, ``field``: a vector field f(t, z) (``networks.py``). The base N(0, I) sits at t = 0 and
the data at t = T (``integration_time``): samples integrate 0 → T, and a data point's exact
log-likelihood integrates it back to 0 together with ∫ tr ∂f/∂z (``objectives.py``), the trace exact
or by Hutchinson's estimator (``dynamics.py``), gradients by the adjoint method or by backpropagation
through the solver. Images are dequantised and logit-transformed, so their likelihood is a bound on
the discrete pixels' (bits/dim). On 2-D points the run also shows the density on a grid over time and
compares it with a histogram of samples (``density.py``, ``figures.py``, the ``density_grid`` metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as default
from typing import Literal, Optional

import torch

from gensuite.errors import ConfigError
from gensuite.families.cnf.density import compare, grid_log_density, samples_at
from gensuite.families.cnf.dynamics import ADAPTIVE, FIXED_STEP, BackwardNFE, CNFDynamics, Solver, probes
from gensuite.families.cnf.figures import density_heatmaps, histogram_vs_grid
from gensuite.families.cnf.networks import ConcatMLP, ConcatSquashMLP, ConvField, TanhField
from gensuite.families.cnf.objectives import (cnf_log_likelihood, dequantize, discrete_log_likelihood,
                                              inverse_logit_transform, logit_transform)
from gensuite.registry import Batch, GenerativeFamily, Networks, register

POINT_FIELDS = ("concatsquash", "concat", "tanh")


@dataclass
class CNFConfig:
    # the vector field f(t, z)
    field: Literal["concatsquash", "concat", "conv", "tanh"] = "concatsquash"  # conv: images; the others: points
    hidden: list[int] = default(default_factory=lambda: [64, 64, 64])  # concatsquash/concat MLP widths
    conv_channels: list[int] = default(default_factory=lambda: [32, 32])  # conv: ConcatConv2d widths (3x3)
    activation: Literal["tanh", "softplus", "elu"] = "tanh"
    # integration
    integration_time: float = 1.0  # T: base N(0, I) at t = 0, data at t = T
    solver: Literal["dopri5", "dopri8", "bosh3", "adaptive_heun", "rk4", "midpoint", "euler"] = "dopri5"
    rtol: float = 1e-5  # adaptive solvers, training
    atol: float = 1e-5
    step_size: float = 0.05  # fixed-step solvers (rk4, midpoint, euler)
    backprop: Literal["adjoint", "odeint"] = "adjoint"  # odeint_adjoint, or backprop through the solver's steps
    adjoint_seminorm: bool = False  # adjoint: leave the parameters' adjoint out of the error norm (Kidger et al.)
    eval_rtol: float = 1e-5  # likelihood evaluation, samples and figures
    eval_atol: float = 1e-5
    # the trace of ∂f/∂z
    trace: Literal["auto", "exact", "hutchinson"] = "auto"  # training; auto: exact up to exact_trace_max_dim
    exact_trace_max_dim: int = 16  # evaluation is exact up to this dimension too, Hutchinson above it
    noise: Literal["rademacher", "gaussian"] = "rademacher"  # Hutchinson's probes
    # RNODE regularisers (Finlay et al. 2020): weights of ∫‖f‖² dt and ∫‖∂f/∂z‖_F² dt
    kinetic_energy: float = 0.0
    jacobian_norm: float = 0.0
    # images: uniform dequantisation, then w = logit(α + (1 − 2α) y); 0: only centre, w = y − 1/2
    logit_alpha: float = 0.05
    # the exercise's field f_i(z) = tanh(θ_i z_j^k)
    tanh_power: int = 3  # k
    tanh_coupling: Literal["self", "other"] = "self"  # j = i, or j = i + 1 mod D (divergence 0)
    theta_init: Optional[list[float]] = None  # θ at the start (None: all 1)
    theta_target: Optional[list[float]] = None  # θ*: train on samples of the flow with θ* instead of the batch
    # 2-D points: density figures and the density_grid metric
    plot_extent: Optional[float] = None  # the square [-a, a]²; None: around the reference data
    density_grid: int = 128  # grid points per axis
    density_times: Optional[list[float]] = None  # heat-map times; None: 0, T/4, T/2, 3T/4, T
    histogram_time: Optional[float] = None  # the histogram's time; None: T
    histogram_bins: int = 32  # per axis; must divide density_grid
    histogram_samples: int = 20000  # samples in the figure's histogram (the metric: eval.n_samples)

    def __post_init__(self):
        for name in ("integration_time", "rtol", "atol", "step_size", "eval_rtol", "eval_atol"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}", "must be > 0")
        for name in ("exact_trace_max_dim", "tanh_power", "density_grid", "histogram_bins", "histogram_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", "must be >= 1")
        for name in ("hidden", "conv_channels"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name}", "needs at least one layer, each width >= 1")
        for name in ("kinetic_energy", "jacobian_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}", "must be >= 0 (0 turns the regulariser off)")
        if not 0 <= self.logit_alpha < 0.5:
            raise ConfigError("model.logit_alpha", "must be in [0, 0.5) (0: no logit transform)")
        if self.solver in FIXED_STEP and self.step_size > self.integration_time:
            raise ConfigError("model.step_size", f"{self.step_size} is longer than integration_time "
                                                 f"{self.integration_time}; use at most {self.integration_time}")
        if self.adjoint_seminorm and (self.backprop != "adjoint" or self.solver not in ADAPTIVE):
            raise ConfigError("model.adjoint_seminorm", "needs backprop: adjoint and an adaptive solver "
                                                        f"({', '.join(ADAPTIVE)}); set it to false")
        if self.theta_target is not None and self.field != "tanh":
            raise ConfigError("model.theta_target", "the known θ* drives the tanh field only; set field: tanh or "
                                                    "remove theta_target")
        times = self.density_times or []
        if any(not 0 <= t <= self.integration_time for t in times):
            raise ConfigError("model.density_times", f"each time must be in [0, {self.integration_time}] "
                                                     f"(integration_time)")
        if self.histogram_time is not None and not 0 <= self.histogram_time <= self.integration_time:
            raise ConfigError("model.histogram_time", f"must be in [0, {self.integration_time}] (integration_time)")
        if self.density_grid % self.histogram_bins:
            raise ConfigError("model.histogram_bins", f"{self.histogram_bins} does not divide density_grid "
                                                      f"{self.density_grid}; choose a divisor")
        if self.plot_extent is not None and self.plot_extent <= 0:
            raise ConfigError("model.plot_extent", "must be > 0, or null for a square around the data")


@register
class CNF(GenerativeFamily):
    name = "cnf"
    config_class = CNFConfig
    flavors = {
        # FFJORD's toy-data field: three concatsquash layers of 64, tanh (Grathwohl et al., appendix B.1).
        "points": {"field": "concatsquash", "hidden": [64, 64, 64], "activation": "tanh"},
        # CPU-sized image field: two 32-channel ConcatConv2d layers, softplus, Hutchinson's trace.
        "digits": {"field": "conv", "conv_channels": [32, 32], "activation": "softplus", "rtol": 1e-4,
                   "atol": 1e-4, "eval_rtol": 1e-4, "eval_atol": 1e-4, "logit_alpha": 0.05},
        # The exercise: f_i(z) = tanh(θ_i z_i^3), θ learnt from samples of θ* = (1, 1) (the assignment's
        # dynamics), figures over [-4, 4]² at t = 0, 1/4, 1/2, 3/4, 1, histogram at t = 1/2.
        "tanh": {"field": "tanh", "tanh_power": 3, "tanh_coupling": "self", "theta_init": [0.5, 0.5],
                 "theta_target": [1.0, 1.0], "eval_rtol": 1e-6, "eval_atol": 1e-6, "plot_extent": 4.0,
                 "density_grid": 160, "histogram_bins": 40, "histogram_time": 0.5,
                 "density_times": [0.0, 0.25, 0.5, 0.75, 1.0], "histogram_samples": 100000},
        "debug": {"field": "concatsquash", "hidden": [16, 16], "rtol": 1e-3, "atol": 1e-3, "eval_rtol": 1e-4,
                  "eval_atol": 1e-4, "density_grid": 24, "histogram_bins": 6, "density_times": [0.5, 1.0],
                  "histogram_samples": 2000},
    }
    debug_dataset = "moons"
    likelihood_values = ("log_px",)  # with log_likelihood below: the HasLikelihood ability

    def __init__(self, cfg: CNFConfig, data):
        super().__init__(cfg, data)
        dim = data.dim
        if cfg.field == "conv" and data.kind != "image":
            raise ConfigError("model.field", f"conv is for images; {data.dataset} holds {data.kind} (use concatsquash)")
        if cfg.field in POINT_FIELDS and data.kind != "points":
            raise ConfigError("model.field", f"{cfg.field} is for points; {data.dataset} holds images (use conv)")
        if cfg.field == "tanh":
            for name in ("theta_init", "theta_target"):
                value = getattr(cfg, name)
                if value is not None and len(value) != dim:
                    raise ConfigError(f"model.{name}", f"needs one θ per dimension: {dim} values for {data.dataset}")
            if cfg.tanh_coupling == "other" and dim < 2:
                raise ConfigError("model.tanh_coupling", "other needs at least 2 dimensions; use self")
        if cfg.trace == "exact" and dim > cfg.exact_trace_max_dim:
            raise ConfigError("model.trace", f"the exact trace of {dim} dimensions takes {dim} backward passes per "
                                             f"function evaluation; use hutchinson (or auto), or raise "
                                             f"model.exact_trace_max_dim to {dim}")
        self.image = data.kind == "image"
        self.T = cfg.integration_time
        self.solver = Solver(cfg.solver, cfg.rtol, cfg.atol, cfg.step_size, cfg.backprop, cfg.adjoint_seminorm)
        self.eval_solver = Solver(cfg.solver, cfg.eval_rtol, cfg.eval_atol, cfg.step_size, "odeint")
        small = dim <= cfg.exact_trace_max_dim
        self.train_trace = cfg.trace if cfg.trace != "auto" else ("exact" if small else "hutchinson")
        self.eval_trace = "exact" if small else "hutchinson"
        self.regularize = cfg.kinetic_energy > 0 or cfg.jacobian_norm > 0
        self.target = (TanhField(dim, cfg.tanh_power, cfg.tanh_coupling, cfg.theta_target).requires_grad_(False)
                       if cfg.theta_target is not None else None)
        self.times = cfg.density_times if cfg.density_times is not None else [self.T * i / 4 for i in range(5)]
        self.histogram_time = cfg.histogram_time if cfg.histogram_time is not None else self.T

    def build_networks(self):
        c, dim = self.cfg, self.data.dim
        if c.field == "conv":
            return {"field": ConvField(self.data.channels, c.conv_channels, c.activation)}
        if c.field == "tanh":
            return {"field": TanhField(dim, c.tanh_power, c.tanh_coupling, c.theta_init)}
        mlp = ConcatSquashMLP if c.field == "concatsquash" else ConcatMLP
        return {"field": mlp(dim, c.hidden, c.activation)}

    # -- the data's space and the model's -------------------------------------------------------------
    def to_model_space(self, x: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Points: x itself (log-det 0). Images: dequantised with noise u, then logit-transformed."""
        if not self.image:
            return x, x.new_zeros(len(x))
        return logit_transform(dequantize(x, u), self.cfg.logit_alpha)

    def to_data_space(self, w: torch.Tensor) -> torch.Tensor:
        return inverse_logit_transform(w, self.cfg.logit_alpha) if self.image else w

    def data_log_likelihood(self, log_pw: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """Nats per sample: a density of points, or the dequantised bound on the pixels' probability."""
        return discrete_log_likelihood(log_pw, log_det, self.data.dim) if self.image else log_pw + log_det

    # -- training ---------------------------------------------------------------------------------------
    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        c, x = self.cfg, batch["x"]
        if self.target is not None:  # the exercise: fresh samples of the flow with the known θ*
            x = samples_at(self.target.to(x.device), torch.randn(x.shape, device=x.device), self.T, self.eval_solver)
        w, log_det = self.to_model_space(x, torch.rand_like(x) if self.image else None)
        dynamics = CNFDynamics(nets["field"], self.train_trace, self.regularize)
        if self.train_trace == "hutchinson":
            dynamics.noise = probes(c.noise, (1, *w.shape), dtype=w.dtype, device=w.device)
        backward_nfe = BackwardNFE(dynamics, w.device)
        out = cnf_log_likelihood(dynamics, w, self.T, self.solver, x_start=backward_nfe.attach(w))
        backward_nfe.mark()
        log_px = self.data_log_likelihood(out["log_px"], log_det)
        nll = -log_px.mean()
        terms = {"nll": nll}
        loss = nll
        if self.regularize:
            kinetic, jacobian = out["kinetic"].mean(), out["jacobian"].mean()
            loss = loss + c.kinetic_energy * kinetic + c.jacobian_norm * jacobian
            terms.update(kinetic=kinetic, jacobian=jacobian)
        if self.image:
            terms["bpd"] = nll / (self.data.dim * math.log(2))
        terms["nfe_forward"] = torch.tensor(float(dynamics.nfe), device=w.device)
        terms["nfe_backward"] = backward_nfe.value  # filled in during backward()
        if self.cfg.field == "tanh":
            theta = nets.bare("field").theta.detach().clone()  # the value this step started from
            terms.update({f"theta_{i}": v for i, v in enumerate(theta)})
            if self.target is not None:
                terms["theta_error"] = (theta - self.target.theta.to(theta)).norm()
        return {"loss": loss, **terms}

    def validation_terms(self, nets: Networks, batch: Batch, step: int):
        out = super().validation_terms(nets, batch, step)
        for terms in out.values():  # counts what a backward pass costs: none runs on held-out data
            terms.pop("nfe_backward", None)
        return out

    # -- likelihood ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, nets: Networks, batch: Batch, k: int, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """log p(x) per sample in nats, from the EMA field at the evaluation tolerances. Points up to
        ``exact_trace_max_dim`` dimensions: the exact trace, no noise. Images (and wider points): the
        average of k Hutchinson estimates, which is unbiased for log p because log p is linear in the
        trace integral, each sample's probes and dequantisation noise drawn from its own seed; images
        report the dequantised lower bound on log P(pixels) (bits/dim = −value / (D ln 2))."""
        x = batch["x"]
        u = eps = None
        if self.image or self.eval_trace == "hutchinson":
            draws = [self._sample_noise(int(s), k, x) for s in seeds]
            u = torch.stack([d[0] for d in draws]).to(x)
            eps = torch.stack([d[1] for d in draws], 1).to(x)  # (k, N, *shape)
        w, log_det = self.to_model_space(x, u)
        dynamics = CNFDynamics(nets.ema("field"), self.eval_trace)
        dynamics.noise = eps
        log_pw = cnf_log_likelihood(dynamics, w, self.T, self.eval_solver)["log_px"]
        return {"log_px": self.data_log_likelihood(log_pw, log_det)}

    def _sample_noise(self, seed: int, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = tuple(x.shape[1:])
        u = torch.rand(shape, generator=g)
        eps = probes(self.cfg.noise, (k, *shape), g) if self.eval_trace == "hutchinson" else torch.zeros(k, *shape)
        return u, eps

    # -- samples and figures ------------------------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator):
        return {"z": torch.randn(n, *self.data.shape, generator=generator)}

    def sample(self, nets: Networks, fixed):
        return self.to_data_space(samples_at(nets.ema("field"), fixed["z"], self.T, self.eval_solver))

    def extent(self, reference: torch.Tensor | None) -> tuple[float, float]:
        """The square the 2-D figures and the density_grid metric cover: [-a, a]² (plot_extent), or the
        reference points' bounding box widened by a quarter of its side on every side."""
        if self.cfg.plot_extent is not None or reference is None:
            a = self.cfg.plot_extent or 4.0
            return -a, a
        lo, hi = float(reference.min()), float(reference.max())
        margin = 0.25 * (hi - lo)
        return lo - margin, hi + margin

    def density_check(self, field: torch.nn.Module, lo: float, hi: float, n_samples: int, seed: int) -> dict:
        """``density.compare`` at ``histogram_time`` on this run's grid, with samples from ``seed``."""
        c = self.cfg
        return compare(field, self.histogram_time, lo, hi, c.density_grid, c.histogram_bins, n_samples,
                       self.eval_solver, torch.Generator().manual_seed(seed))

    def visuals(self, nets: Networks, fixed, reference: Batch):
        samples = self.sample(nets, fixed)
        if self.image or self.data.dim != 2:
            return {"samples": samples}
        field_, c = nets.ema("field"), self.cfg
        lo, hi = self.extent(reference["x"])
        check = self.density_check(field_, lo, hi, c.histogram_samples, seed=0)
        logs = {t: (check["log_density"] if t == self.histogram_time else
                    grid_log_density(field_, t, lo, hi, c.density_grid, self.eval_solver)) for t in self.times}
        return {"samples": samples, "data": reference["x"],
                "density": density_heatmaps([logs[t] for t in self.times], self.times, lo, hi),
                "histogram": histogram_vs_grid(check, self.histogram_time, lo, hi, c.histogram_samples)}


from gensuite.families.cnf import metrics  # noqa: E402,F401  (registers the density_grid metric)
