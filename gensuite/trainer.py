"""The one training loop every family runs through.

``Trainer.run`` reads top to bottom: set up (data, networks, optimisers, resume), then iterate:
each player of the family steps in turn (a GAN's D ``n_critic`` times, then G), EMA copies follow,
and at fixed intervals the loop logs, draws sample grids, computes the validation curves and the
metrics (``eval.every`` and the end) and checkpoints; a spent ``train.time_budget_min`` makes the
current step the end. Families plug in through
the contract in ``gensuite.registry`` (its hooks: ``initialize``, ``after_step``, per-rank state);
each player steps through an engine from ``gensuite.distributed`` (plain/DDP or DeepSpeed), so the
loop never asks which strategy runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import gensuite
from gensuite import checkpoint as ckpt
from gensuite import evaluation
from gensuite.config import JobConfig, OptimizerSpec, closest, dump_yaml
from gensuite.data.pipeline import SKIPPED, ShardStream, make_loader, read_split, split_shards, worker_error_message
from gensuite.data.shards import data_spec, open_shard_set
from gensuite.distributed import (Runtime, StopRequest, node_name, player_engine, prepare_networks, rng_state,
                                  seed_everything, set_rng_state)
from gensuite.errors import ConfigError, DiskFull, GensuiteError, Interrupted, AlreadyReported, TrainingDiverged
from gensuite.evaluation.validation import ValidationPlan, validation_values
from gensuite.logger import RunLogger
from gensuite.registry import Family, Networks, Player, complete_job, get_family, sampling_mode


@dataclass
class BatchPlan:
    """How the global batch maps onto ranks and accumulation micro-steps."""

    global_batch: int
    per_rank: int
    micro: int
    accumulation: int

    @classmethod
    def of(cls, job: JobConfig, world_size: int) -> BatchPlan:
        size = job.train.batch_size
        if size % world_size:
            raise ConfigError("train.batch_size", f"{size} is not divisible by the {world_size} ranks; "
                                                  f"use a multiple of {world_size}")
        per_rank = size // world_size
        micro = min(job.train.micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            raise ConfigError("train.micro_batch_size", f"{micro} does not divide the per-rank batch {per_rank}")
        return cls(size, per_rank, micro, per_rank // micro)


@dataclass
class JobPlan:
    """What a job does on a shard set and a rank count: its family, players and batch split.

    ``gensuite validate``, the launcher's preflight and the trainer build it the same way, so a job
    that validates is not refused by the trainer before its first step."""

    job: JobConfig  # with the settings the family copies from other runs filled in (complete_config)
    family: Family
    players: list[Player]
    batch: BatchPlan
    batches_per_epoch: int | None  # None: the training split's size is unknown (no shards yet)

    @classmethod
    def of(cls, job: JobConfig, spec, world_size: int, inputs_required: bool = True) -> JobPlan:
        """``inputs_required``: the runs the family copies settings or frozen networks from must exist
        (not yet for ``gensuite validate`` without ``--data``)."""
        job = complete_job(job, inputs_required)
        family: Family = get_family(job.family)(job.model, spec)
        players = family.players()
        batch = BatchPlan.of(job, world_size)
        networks = [n for p in players for n in p.networks] + list(family.frozen_networks())
        for name, overrides in job.optim.players.items():
            if name not in {p.name for p in players}:
                raise ConfigError(f"optim.players.{name}", f"no such player{_close(name, [p.name for p in players])}; "
                                                           f"the {job.family} family has "
                                                           f"{', '.join(p.name for p in players)}")
        for i, name in enumerate(job.train.ema.networks):
            if name not in networks:
                raise ConfigError(f"train.ema.networks[{i}]", f"unknown network {name!r}{_close(name, networks)}; "
                                                             f"the {job.family} family has {', '.join(networks)}")
        if job.train.strategy == "deepspeed" and job.train.precision == "fp16":  # bf16 is autocast over fp32
            raise ConfigError("train.precision", "fp16 under strategy deepspeed needs DeepSpeed's loss scaler, "
                                                 "which this loop does not drive; use bf16")
        train_samples = spec.samples.get("train")
        per_epoch = None
        if train_samples is not None:
            per_epoch = train_samples // batch.global_batch
            if per_epoch < 1:
                raise ConfigError("train.batch_size", f"{batch.global_batch} exceeds the {train_samples} training "
                                                      f"samples of {spec.dataset}; use at most {train_samples}")
        return cls(job, family, players, batch, per_epoch)


def _close(name: str, options: list[str]) -> str:
    match = closest(name, options, cutoff=0.5)
    return f" (did you mean {match}?)" if match else ""


def build_optimizer(params: list[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.RMSprop(params, lr=spec.lr, momentum=spec.momentum, eps=spec.eps,
                               weight_decay=spec.weight_decay)


def lr_factor(spec: OptimizerSpec, total_steps: int, steps_per_epoch: float = 1.0):
    """Linear warm-up, then constant, step decay every ``decay_every_epochs``, or cosine or linear
    decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        if spec.schedule == "step":
            return spec.decay_factor ** int(step // (spec.decay_every_epochs * steps_per_epoch))
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1.0 - progress

    return factor


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """Tensors moved to ``device``; other fields (caption lists) kept as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


class Trainer:
    def __init__(self, job: JobConfig, run_dir: str | Path, runtime: Runtime | None = None,
                 stop: StopRequest | None = None):
        self.job = job
        self.stop = stop
        self.run_dir = Path(run_dir)
        self.rt = runtime or Runtime(job.train.precision)
        self.shard_dir = Path(job.data.root) / job.data.dataset
        self.manifest = open_shard_set(self.shard_dir)  # every shard checked against its sha256
        self.spec = data_spec(self.manifest)
        planned = JobPlan.of(job, self.spec, self.rt.world_size)
        self.job = planned.job
        self.family: Family = planned.family
        self.plan = planned.batch
        self.players: list[Player] = planned.players
        self.batches_per_epoch = planned.batches_per_epoch
        data_steps = sum(p.steps for p in self.players if p.consumes_data) or 1
        self.steps_per_epoch = self.batches_per_epoch / data_steps
        self.total_steps = job.train.steps or max(1, round(job.train.epochs * self.steps_per_epoch))

        if self.family.held_out_conditions:  # e.g. test captions to sample for; kept in checkpoints
            self.family.set_conditions(read_split(self.shard_dir, self._held_out_split(),
                                                  self.family.held_out_conditions,
                                                  fields=set(self.family.condition_fields)))
        seed_everything(job.train.seed)  # identical initial weights on every rank
        self._build_networks()
        self._build_optimizers()
        self.metrics = evaluation.resolve(job.eval, self.family)
        evaluation.check_inputs(job.eval, self.metrics)
        self.validation = ValidationPlan.of(job.eval, self.spec.samples)  # None: no validation curves
        self.best: dict[str, Any] = {}  # {"value", "step"} of eval.best so far
        self.protocol_logged = False  # the eval protocol text goes to TensorBoard once per run
        self.validation_logged = False  # and the validation protocol
        self.step = 0
        self.train_seconds = 0.0  # time spent in training steps, summed over resumes (train.time_budget_min)
        self.out_of_time = False  # the budget is spent: the ranks agreed at the end of a step
        self.consumed = 0  # micro-batches this rank has drawn: the data position
        self.logger = RunLogger(self.run_dir, job, enabled=self.rt.is_main,
                                origin=f"{node_name()} rank {self.rt.rank}/{self.rt.world_size}")
        self.write_failure: DiskFull | None = None  # rank 0's, held until the ranks agree to stop
        if self.rt.is_main:
            for folder in (self.run_dir, ckpt.checkpoint_dir(self.run_dir)):
                for stale in ckpt.remove_stale_temporaries(folder):
                    self.logger.info(f"removed {stale}, left by an interrupted write")
        # Each rank draws different noise, reproducibly.
        seed_everything((job.train.seed + 1) * 100_003 + self.rt.rank)
        self._resume()

    # -- set-up ---------------------------------------------------------------------------------
    def _build_networks(self) -> None:
        nets = self.family.build_networks()
        frozen = self.family.frozen_networks()
        # Data-dependent initialisation, alike on every rank (the same stored-order batch), before
        # EMA copies and DDP wrappers are made from the networks; a resume loads over it.
        if self.family.initializes_from_data:
            first = read_split(self.shard_dir, "train", self.plan.global_batch,
                               on_bad_sample=self.job.data.on_bad_sample)
            self.family.initialize(Networks(nets), first)
        for name, source in frozen.items():
            source, name_there = source if isinstance(source, tuple) else (source, name)
            weights = load_network(source, name_there)
            try:
                nets[name].load_state_dict(weights)
            except RuntimeError as e:  # a shape mismatch lists every tensor: keep the first line
                raise GensuiteError(f"{source}: network {name_there!r} does not fit this job's {name} "
                                    f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                                    f"train it with matching model settings") from None
            set_trainable(nets[name], False)
            nets[name].eval()
        owners = {n: p.name for p in self.players for n in p.networks}
        orphans = [n for n in nets if n not in owners and n not in frozen]
        if orphans:
            raise RuntimeError(f"family {self.job.family}: networks {orphans} belong to no player")
        self.bare = nets  # unwrapped modules: checkpoints, frozen views, sampling
        self.ema = {
            n: AveragedModel(nets[n], multi_avg_fn=self._ema_average(), use_buffers=True)
            .to(self.rt.device).eval()
            for n in self.job.train.ema.networks
        }
        self.modules = prepare_networks(self.rt, nets, self.job.train.strategy)

    def _build_optimizers(self) -> None:
        """One engine per player (its optimiser, however the ranks share the work) and its LR schedule."""
        self.engines, self.schedulers = {}, {}
        for p in self.players:
            spec = self.job.optim.for_player(p.name)
            params = [q for n in p.networks for q in self.modules[n].parameters()]
            opt = build_optimizer(params, spec)
            # Not prepared by Accelerate: its scheduler wrapper steps once per process.
            self.schedulers[p.name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_factor(spec, self.total_steps, self.steps_per_epoch))
            self.engines[p.name] = player_engine(self.rt, self.job.train.strategy,
                                                 {n: self.modules[n] for n in p.networks}, opt, spec.grad_clip,
                                                 self.job.train.deepspeed, self.plan.micro, self.plan.accumulation)

    def _resume(self) -> None:
        resume = self.job.train.resume
        if resume == "never":
            return
        if resume == "auto":
            skipped: list[Path] = []

            def warn(message: str) -> None:
                skipped.append(Path(message.removeprefix("skipping ").split(": ", 1)[0]))
                self.logger.info(f"warning: {message}")

            found = ckpt.load_latest_readable(self.run_dir, warn)
            if found is None:
                return
            path, state = found
            self.rt.barrier()  # every rank has chosen before rank 0 renames what it skipped
            if self.rt.is_main:
                for kept in ckpt.set_aside_unreadable(skipped):
                    self.logger.info(f"warning: kept the unreadable checkpoint as {kept}; resuming from {path}")
        else:  # a checkpoint file, or another run directory's newest checkpoint
            path, state = ckpt.load_source(resume, lambda message: self.logger.info(f"warning: {message}"))
        saved = state["config"]
        for key in ("family", "flavor"):
            if saved[key] != getattr(self.job, key):
                raise GensuiteError(f"{path}: checkpoint is a {saved['family']}/{saved['flavor']} run, the job is "
                                    f"{self.job.family}/{self.job.flavor}; use another --run-dir or train.resume: never")
        saved_strategy = state.get("strategy", "ddp")
        sharded = any(e.sharded for e in self.engines.values())
        if saved_strategy != self.job.train.strategy or (sharded and state["data"]["world_size"] != self.rt.world_size):
            raise GensuiteError(f"{path}: written by a {saved_strategy} run on {state['data']['world_size']} ranks; "
                                f"resume it with the same train.strategy"
                                + (" and rank count (ZeRO partitions the optimizer by rank)" if sharded else ""))
        for name, module in self.bare.items():
            ckpt.check_fits(module, state["networks"].get(name, {}), str(path), name)
            module.load_state_dict(state["networks"][name])
        for name, avg in self.ema.items():
            if name not in state.get("ema", {}):
                raise GensuiteError(f"{path}: the checkpoint has no EMA copy of {name}, which train.ema.networks "
                                    f"asks for; resume with the run's train.ema settings or use another --run-dir")
            ckpt.check_fits(avg, state["ema"][name], str(path), f"EMA {name}")
            avg.load_state_dict(state["ema"][name])
        for name, engine in self.engines.items():
            engine.load(state["optimizers"].get(name, {}), ckpt.sharded_dir(path), tag=name)
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        scaler = self.rt.accelerator.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.family.load_state_dict(state["family"])
        saved_world = state["data"]["world_size"]
        per_rank = state.get("family_ranks") or [{}] * saved_world
        if saved_world == self.rt.world_size:
            self.family.load_rank_state_dict(per_rank[self.rt.rank])
        elif any(per_rank):
            self.logger.info(f"warning: {path} holds per-rank family state of {len(per_rank)} ranks; this run has "
                             f"{self.rt.world_size}, so each rank starts its own afresh")
        self.best = state.get("best", {})
        self.step = state["step"]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.consumed = state["data"]["micro_batches"] * saved_world // self.rt.world_size
        if saved_world == self.rt.world_size:
            set_rng_state(state["rng"][self.rt.rank])
        self.logger.info(f"resumed from {path} at step {self.step}"
                         + ("" if saved_world == self.rt.world_size else
                            f" (world size {saved_world} -> {self.rt.world_size}: data order and RNG re-derived)"))

    def _held_out_split(self) -> str:
        return next((s for s in (self.job.eval.split, "test", "validation") if s in self.manifest["splits"]),
                    "train")

    def _data(self):
        shards = split_shards(self.manifest, self.shard_dir, "train")
        stream = ShardStream(shards, self.spec.kind, self.spec.channels, self.plan.micro,
                             self.batches_per_epoch * self.plan.accumulation, self.rt.rank, self.rt.world_size,
                             self.job.train.seed, self.job.data.shuffle_buffer, start_batch=self.consumed,
                             shape=self.spec.shape, on_bad_sample=self.job.data.on_bad_sample)
        self.skipped_samples, self.skips_logged = 0, 0  # on_bad_sample: skip (all ranks' count, as last logged)
        return iter(make_loader(stream, self.job.data.workers))

    def _next_batches(self, data) -> list[dict[str, torch.Tensor]]:
        batches = []
        for _ in range(self.plan.accumulation):
            try:
                batch = next(data)
            except GensuiteError as e:  # from a DataLoader worker, torch makes the message its traceback text
                if "\n" not in str(e):
                    raise
                raise GensuiteError(worker_error_message(e)) from None
            self.skipped_samples += int(batch.pop(SKIPPED, 0))
            batches.append(to_device(batch, self.rt.device))
            self.consumed += 1
        if self.job.data.on_bad_sample == "skip" and self.step % self.job.train.log_every == 0:
            skipped = int(self.rt.sum_across_ranks(torch.tensor([float(self.skipped_samples)], dtype=torch.float64)))
            if skipped > self.skips_logged:
                self.logger.info(f"step {self.step}: skipped {skipped} samples so far that do not decode "
                                 f"(data.on_bad_sample: skip)")
                self.skips_logged = skipped
        return batches

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        job, log = self.job, self.logger
        with self.rank0_writes():
            log.start(self, resumed=self.step > 0)
        self._stopping()  # e.g. no room for the event file
        log.info(f"{self.rt.describe()}: {job.family}/{job.flavor} on {self.spec.dataset}, steps "
                 f"{self.step}->{self.total_steps}, global batch {self.plan.global_batch} = {self.rt.world_size} "
                 f"ranks x {self.plan.accumulation} x {self.plan.micro}")
        fixed = {k: v.to(self.rt.device) for k, v in
                 self.family.fixed_inputs(job.log.grid_size, torch.Generator().manual_seed(job.train.seed)).items()}
        for note in evaluation.skipped(job.eval, self.family):
            log.info(f"eval: skipping {note}")
        if self.validation is None and job.eval.validation_batches:
            log.info(f"eval: no validation curves: {self.spec.dataset} has no validation or {job.eval.split} split")
        reference = self._reference_batch()
        data = self._data()
        for m in self.modules.values():
            m.train()
        for name in self.family.frozen_networks():
            self.bare[name].eval()
        batches = None
        started = self.step
        if self._budget_spent():  # a run that ended on its time budget, resumed
            log.info(f"train.time_budget_min ({job.train.time_budget_min} min) was spent at step {self.step}; "
                     f"nothing left to train")
        while self.step < self.total_steps and not self.out_of_time:
            began = time.perf_counter()
            self.step += 1
            # Log-only diagnostics (gradient norms, a family's monitoring terms) are computed on the steps
            # that log them; a step ended early by the time budget logs without them.
            log_due = self.step % job.train.log_every == 0 or self.step == self.total_steps
            self.family.log_step = log_due
            for player in self.players:
                for _ in range(player.steps):
                    if player.consumes_data or batches is None:
                        batches = self._next_batches(data)
                        log.count_samples(self.plan.global_batch)
                    log.add_terms(player.name, self.player_step(player, batches))
            self.family.log_step = True  # validation, evaluation and sampling see every term
            self.update_ema()
            self.train_seconds += time.perf_counter() - began
            log.advance()
            # the last step: train.steps reached, or the time budget spent (then the run ends as at its last step)
            last = self.step == self.total_steps or self._budget_spent()
            if self.out_of_time and self.step < self.total_steps:
                log.info(f"step {self.step}: train.time_budget_min ({job.train.time_budget_min} min) spent after "
                         f"{self.train_seconds:.1f} s of training; ending here")
            if log_due or last:
                with self.rank0_writes():
                    log.scalars(self.step, self._lrs(), self.train_seconds)
            if self.step % job.train.sample_every == 0 or last:
                self.log_visuals(fixed, reference)
            if last or (job.eval.every and self.step % job.eval.every == 0):
                self.run_validation()
                if self.metrics:
                    self.run_evaluation()
            saved = self.step % job.train.checkpoint_every == 0 or last
            if saved:
                self.save()
            if self._stopping():
                self._stop_on_signal(saved)
        if self.step == started and job.train.resume not in ("auto", "never"):
            # Another run's finished checkpoint, resumed to be evaluated (e.g. with another sampler).
            log.say(f"nothing to train: the checkpoint is at step {self.step} of {self.total_steps}; evaluating it")
            self.log_visuals(fixed, reference)
            self.run_validation()
            if self.metrics:
                self.run_evaluation()
        log.say(f"finished at step {self.step}; parameter checksum {self.parameter_checksum()}")
        with self.rank0_writes():
            metrics = log.finish(self.step)
        self._stopping()
        return metrics

    @contextlib.contextmanager
    def rank0_writes(self):
        """Rank 0's files (event files, grids, checkpoints). A full disk there is held until the
        step's end, where all ranks learn of it together: no rank is left waiting in a collective."""
        try:
            yield
        except DiskFull as e:
            self.write_failure = self.write_failure or e

    def _budget_spent(self) -> bool:
        """Whether ``train.time_budget_min`` is spent, as rank 0 measured it, on every rank (sets ``out_of_time``)."""
        budget = self.job.train.time_budget_min
        if budget is not None and not self.out_of_time:
            spent = self.rt.is_main and self.train_seconds >= budget * 60
            self.out_of_time = self.rt.flags_across_ranks([spent])[0]
        return self.out_of_time

    def _stopping(self) -> bool:
        """Whether any rank was asked to stop; raises a full disk on rank 0 on every rank."""
        stop_asked, write_failed = self.rt.flags_across_ranks(
            [self.stop is not None and self.stop.requested, self.write_failure is not None])
        if write_failed:
            raise self.write_failure if self.write_failure is not None else AlreadyReported()
        return stop_asked

    def parameter_checksum(self) -> str:
        """sha256 of every network's parameters: equal on all ranks iff they hold bitwise-equal weights.

        Buffers (BatchNorm statistics) are left out: DDP broadcasts rank 0's at each forward and
        checkpoints hold rank 0's, but a frozen network's forward may update them locally."""
        digest = hashlib.sha256()
        for name in sorted(self.bare):
            for key, value in sorted(self.bare[name].named_parameters()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def _stop_on_signal(self, saved: bool) -> None:
        path = ckpt.latest_checkpoint(self.run_dir) if saved else self.save()
        self._stopping()  # a full disk while writing that checkpoint ends the run with that error
        path = self.rt.broadcast_object(str(path))
        self.logger.say(f"signal received; stopping after step {self.step} (checkpoint {path})")
        # The signal one rank got decides for all (SIGUSR2: requeue; else checkpoint and exit).
        signum = self.stop.signal or 0
        requeue = self.rt.any_across_ranks(self.stop.requeue)
        signum = max(self.rt.gather_object(signum)) if signum == 0 or self.rt.world_size > 1 else signum
        raise Interrupted(signum, self.step, path, requeue, announce=self.rt.is_main)

    def player_step(self, player: Player, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One optimiser step of ``player`` over the accumulated micro-batches; others are frozen."""
        active = set(player.networks)
        for name, module in self.bare.items():
            set_trainable(module, name in active)
        view = Networks({n: self.modules[n] if n in active else self.bare[n] for n in self.bare},
                        {n: avg.module for n, avg in self.ema.items()})
        engine = self.engines[player.name]
        engine.zero_grad()
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with engine.micro_step(last):
                with self.rt.autocast():
                    terms = self.family.loss(player.name, view, batch, self.step)
                engine.backward(terms["loss"], len(batches), last)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / len(batches)
        names = list(sums)
        values = self.rt.mean_across_ranks(torch.stack([sums[k] for k in names]))
        host = values.tolist()  # the step's one device-to-host copy: the terms are checked and logged from it
        bad = [k for k, v in zip(names, host) if not math.isfinite(v)]
        if bad:  # before the optimiser step: parameters and checkpoints stay finite
            latest = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(f"step {self.step}: loss term {player.name}/{bad[0]} is "
                                   f"{host[names.index(bad[0])]}; stopped; last good checkpoint: "
                                   f"{latest or 'none yet'}")
        grad_norm = engine.step(measure_norm=self.family.log_step)  # the norm before clipping, or None
        with torch.no_grad():
            self.family.after_step(player.name, view, self.step)
        self.schedulers[player.name].step()
        out: dict[str, float | torch.Tensor] = dict(zip(names, host))
        if self.family.log_step:  # the log step's own norm (also when clipping measured it every step)
            out["grad_norm"] = grad_norm.detach()  # stays on the device until logged (no sync here)
        return out

    def eval_context(self) -> evaluation.EvalContext:
        return evaluation.EvalContext(
            self.family, Networks(self.bare, {n: avg.module for n, avg in self.ema.items()}), self.shard_dir,
            self.job.eval, self.rt.device, self.rt.rank, self.rt.world_size, self.rt.sum_across_ranks)

    @contextlib.contextmanager
    def eval_mode(self, frozen: bool = False):
        """Every network in eval mode (dropout off, BatchNorm on its running statistics, which then stay
        as they are) and, with ``frozen``, no parameter requiring gradients; both restored afterwards."""
        modes = {n: m.training for n, m in self.bare.items()}
        trainable = {n: [p.requires_grad for p in m.parameters()] for n, m in self.bare.items()}
        for m in self.bare.values():
            m.eval()
            if frozen:
                set_trainable(m, False)
        try:
            yield
        finally:
            for n, m in self.bare.items():
                m.train(modes[n])
                for p, flag in zip(m.parameters(), trainable[n]):
                    p.requires_grad_(flag)

    def run_validation(self) -> dict[str, float]:
        """Every player's training objective on held-out batches (``gensuite.evaluation.validation``),
        logged by rank 0 as ``val/<player>/<term>`` beside the training curves.

        The raw networks the training curve comes from, not the EMA copies, so the two curves differ
        only by the data (and by eval mode: no dropout, BatchNorm's running statistics). Nothing that
        training reads changes: RNG states are restored, parameters frozen, buffers (BatchNorm's, an EBM's
        replay buffer) untouched, so a run validating every step ends bitwise where one without does."""
        if self.validation is None:
            return {}
        with self.eval_mode(frozen=True):
            values = validation_values(self.eval_context(), self.validation, self.step, self.rt.autocast,
                                       self.rt.gather_object)
        first, self.validation_logged = not self.validation_logged, True
        with self.rank0_writes():
            self.logger.validation_values(self.step, values, self.validation.describe() if first else None)
        return values

    def run_evaluation(self) -> dict[str, Any]:
        """Every rank evaluates its share; rank 0 logs; a better ``eval.best`` value saves best.pt."""
        ctx = self.eval_context()
        with self.eval_mode():
            values = evaluation.evaluate(self.metrics, ctx)
        first, self.protocol_logged = not self.protocol_logged, True
        with self.rank0_writes():
            self.logger.eval_values(self.step, values, evaluation.protocol(self.metrics, ctx) if first else None)
        name = self.job.eval.best
        if name is not None:
            better = evaluation.higher_is_better(self.metrics, self.family, name)
            old = self.best.get("value")
            if old is None or (values[name] > old if better else values[name] < old):
                self.best = {"value": values[name], "step": self.step}
                self.save(best=True)
        return values

    def _ema_average(self):
        ema = self.job.train.ema
        if not ema.warmup:
            return get_ema_multi_avg_fn(ema.decay)

        @torch.no_grad()
        def warmed(averages: list[torch.Tensor], current: list[torch.Tensor], _count) -> None:
            n = self.step - 1  # updates before this one (the first copies the weights)
            decay = min(ema.decay, (1 + n) / (10 + n))
            if torch.is_floating_point(averages[0]):
                torch._foreach_lerp_(averages, current, 1.0 - decay)
            else:  # integer buffers (BatchNorm's batch count), as torch's own EMA function treats them
                for average, now in zip(averages, current):
                    average.copy_(average * decay + now * (1 - decay))
        return warmed

    def update_ema(self) -> None:
        for name, avg in self.ema.items():
            avg.update_parameters(self.bare[name])

    def _lrs(self) -> dict[str, float]:
        return {p: s.get_last_lr()[0] for p, s in self.schedulers.items()}

    def _reference_batch(self) -> dict[str, torch.Tensor]:
        split = self.job.data.reference_split
        if split not in self.manifest["splits"]:
            split = "train"
        return to_device(read_split(self.shard_dir, split, self.job.log.grid_size), self.rt.device)

    def log_visuals(self, fixed, reference) -> None:
        if not self.rt.is_main:
            return
        nets = Networks(self.bare, {n: avg.module for n, avg in self.ema.items()})
        with self.eval_mode(), sampling_mode(self.family):
            visuals = self.family.visuals(nets, fixed, reference)
        with self.rank0_writes():
            self.logger.visuals(self.step, visuals, self.family)

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self, rng_states: list[dict[str, Any]], family_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        scaler = self.rt.accelerator.scaler
        return {
            "gensuite_version": gensuite.__version__,
            "step": self.step,
            "config": self.job.to_dict(),
            "networks": {n: m.state_dict() for n, m in self.bare.items()},
            "ema": {n: avg.state_dict() for n, avg in self.ema.items()},
            # Under DeepSpeed each rank's optimizer partition lives in checkpoints/sharded/<step>/.
            "optimizers": {n: e.state_dict() for n, e in self.engines.items() if not e.sharded},
            "strategy": self.job.train.strategy,
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "family": self.family.state_dict(),
            "family_ranks": family_ranks,  # rank_state_dict() of every rank, by rank
            # Enough to rebuild the networks and sample without the shards (gensuite sample).
            "data_spec": self.spec.to_dict(),
            "data": {"micro_batches": self.consumed, "world_size": self.rt.world_size,
                     "epoch": self.consumed // (self.batches_per_epoch * self.plan.accumulation)},
            "rng": rng_states,
            "best": self.best,
            "train_seconds": self.train_seconds,  # rank 0's, which decides when the time budget is spent
        }

    def save(self, best: bool = False) -> Path | None:
        """A resumable step checkpoint, or (``best``) checkpoints/best.pt for sampling and evaluation."""
        rngs = self.rt.gather_object(rng_state())  # every rank's RNG, so each resumes its own stream
        family_ranks = self.rt.gather_object(self.family.rank_state_dict())
        if best:
            path = None
            if self.rt.is_main:
                with self.rank0_writes():
                    path = ckpt.save_named(self.run_dir, "best", self.state(rngs, family_ranks))
                    self.logger.info(f"step {self.step}: new best eval/{self.job.eval.best} = "
                                     f"{self.best['value']:.5g}; {path}")
            self.rt.barrier()
            return path
        if any(e.sharded for e in self.engines.values()):  # collective; before the step file that makes it count
            folder = ckpt.sharded_dir(ckpt.checkpoint_path(self.run_dir, self.step))
            for name, engine in self.engines.items():
                engine.save_sharded(folder, tag=name)
            self.rt.barrier()
        path = None
        if self.rt.is_main:
            with self.rank0_writes():
                path = ckpt.save_checkpoint(self.run_dir, self.step, self.state(rngs, family_ranks),
                                            self.job.train.keep_checkpoints)
                self.logger.info(f"step {self.step}: checkpoint {path}")
        self.rt.barrier()
        return path


def load_network(source: str, name: str) -> dict[str, torch.Tensor]:
    """Weights of network ``name`` from a checkpoint file or the latest checkpoint of a run dir."""
    path, state = ckpt.load_source(source)
    if name not in state["networks"]:
        raise GensuiteError(f"{path}: checkpoint has no network {name!r} (it has {', '.join(state['networks'])})")
    ema = ckpt.ema_weights(state, name)  # prefer the EMA weights a run samples with
    return ema if ema is not None else state["networks"][name]


def architecture_text(nets: dict[str, nn.Module], frozen: dict[str, Any]) -> str:
    """Every network's structure and parameter count, as written to <run>/architecture.txt."""
    parts = []
    for name, net in nets.items():
        count = sum(p.numel() for p in net.parameters())
        origin = f", frozen, loaded from {frozen[name]}" if name in frozen else ""
        parts.append(f"== {name}: {type(net).__name__}, {count:,} parameters{origin}\n{net}\n")
    total = sum(p.numel() for net in nets.values() for p in net.parameters())
    return "\n".join(parts) + f"\ntotal: {total:,} parameters\n"


def preflight(job: JobConfig, world_size: int | None = None) -> JobPlan:
    """What a job would fail on before its first step, checked before it is queued or started: its
    shards, its model, optimiser and batch settings on ``world_size`` ranks (default: the launch
    section's), and the runs its frozen networks come from (one-line errors)."""
    spec = data_spec(open_shard_set(Path(job.data.root) / job.data.dataset))
    planned = JobPlan.of(job, spec, world_size or job.launch.world_size)
    for source in planned.family.frozen_networks().values():
        ckpt.resolve_checkpoint(source[0] if isinstance(source, tuple) else source)
    return planned


def train(job: JobConfig, run_dir: str | Path, stop: StopRequest | None = None) -> dict[str, float]:
    """Run (or resume) a job; returns the final logged metrics on rank 0.

    With ``stop``, a signal makes every rank checkpoint after the current step and raise
    ``Interrupted`` (the SLURM task requeues on it)."""
    own_stop = stop is None
    stop = StopRequest().install() if own_stop else stop
    try:
        runtime = Runtime(job.train.precision)
        run_dir = Path(run_dir)
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(job, run_dir, runtime, stop)
        if runtime.is_main:  # only now: a job its checkpoints refuse leaves the run's config.yaml as it was
            with trainer.rank0_writes():
                ckpt.atomic_write_text(run_dir / "config.yaml", dump_yaml(trainer.job))
                ckpt.atomic_write_text(run_dir / "architecture.txt",
                                       architecture_text(trainer.bare, trainer.family.frozen_networks()))
        try:
            trainer._stopping()
            return trainer.run()
        finally:
            with contextlib.suppress(DiskFull):  # the first full-disk error has been raised already
                trainer.logger.close()
    finally:
        if own_stop:
            stop.uninstall()
