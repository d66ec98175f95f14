"""Every line that knows about processes, devices and mixed precision lives here.

``Runtime`` wraps an ``accelerate.Accelerator``: a single process without any launcher, or the
ranks started by ``accelerate launch``/``torchrun``/SLURM (env:// rendezvous). Networks and
families never import this module.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import sys
from typing import Any, Iterable, NoReturn

import numpy as np
import torch
from torch import nn

from gensuite.errors import GensuiteError


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> bool:
    """Keep the memory a training step frees for the next step, instead of glibc's malloc (PyTorch's
    CPU allocator) handing it back to the OS and page-faulting it in again.

    By default glibc serves blocks over a moving threshold (128 KiB, rising to at most 32 MiB) by mmap,
    unmapped again when freed, and trims the heap's free top once it exceeds twice that: a step that
    frees and reallocates tens of MiB of activations then faults on every page, every step (the DCGAN
    loop benchmark: ~4,000 minor faults and 10-20 % longer steps in some runs, none in others). Fixed
    thresholds (which stop the moving): blocks up to 512 MiB come from the heap, and up to 1 GiB of free
    heap top is kept for reuse. Returns whether set (False off glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 512 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


class Runtime:
    def __init__(self, precision: str = "no", cpu: bool | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # Accelerate keeps its settings in process-wide singletons; a second run in the same
        # process (tests, benchmarks, sweeps run locally) may ask for another precision. The
        # process group (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()

        cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        if precision == "fp16" and cpu:
            raise GensuiteError("train.precision: fp16 needs a GPU; use bf16 or no on CPU")
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
        self.precision = precision
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        if self.world_size > 1:
            atexit.register(_leave_process_group)  # a repeat (several runs in one process) finds no group

    # -- topology ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} on {node_name()} "
                f"(local rank {self.accelerator.local_process_index}, device {self.device})")

    # -- models and optimisers --------------------------------------------------------------
    def prepare_module(self, module: nn.Module) -> nn.Module:
        """Move to device; wrap in DDP when several ranks share trainable parameters."""
        if not any(p.requires_grad for p in module.parameters()):
            return module.to(self.device)
        return self.accelerator.prepare_model(module)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer):
        # Accelerate's wrapper matters here only for fp16 loss scaling (accumulation and DDP are ours); its
        # step() also looks for optional packages on every call (~30 µs each, twice a step): without a
        # scaler the optimizer stays bare.
        if self.accelerator.scaler is None:
            return optimizer
        return self.accelerator.prepare_optimizer(optimizer)

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, modules: Iterable[nn.Module]):
        """Skip the gradient all-reduce of these modules (all but the last accumulation micro-step)."""
        stack = contextlib.ExitStack()
        for m in modules:
            if isinstance(m, nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())
        return stack

    def clip_grad_norm(self, optimizer, params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
        """Unscale (fp16) and clip to ``max_norm`` (None: only measure); returns the total norm before
        clipping."""
        self.accelerator.unscale_gradients(optimizer)
        if max_norm is None:  # measured, not clipped: no pass multiplying every gradient by 1
            return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- collectives ------------------------------------------------------------------------
    def mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        return self.accelerator.reduce(values.detach().clone(), reduction="mean")

    def gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (CPU tensors in and out; float64 keeps sums exact enough)."""
        if self.world_size == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), reduction="sum").cpu()

    def any_across_ranks(self, flag: bool) -> bool:
        return self.flags_across_ranks([flag])[0]

    def flags_across_ranks(self, flags: list[bool]) -> list[bool]:
        """Each flag set on any rank (one small all-reduce for all of them)."""
        if self.world_size == 1:
            return list(flags)
        summed = self.accelerator.reduce(torch.tensor([float(f) for f in flags], device=self.device),
                                         reduction="sum")
        return [bool(v) for v in summed.tolist()]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.accelerator.end_training()


def exit_rank(code: int) -> NoReturn:
    """End a rank's process with ``code``.

    Works around a gloo bug (pytorch/pytorch#179291, open): a process-group worker thread can drop
    its last reference to a finished collective's tensors while the interpreter is finalizing; it
    can no longer take the GIL, and the process aborts after the run finished ("terminate called
    without an active exception", SIGABRT; seen in about 1 in 15 two-rank runs under load, core
    dumps show ``AsyncAllreduceWork::~AsyncAllreduceWork`` in ``ProcessGroupGloo::runLoop``). A
    rank of a multi-process run therefore runs the atexit handlers (which destroy the group),
    flushes its output and leaves with ``os._exit``, skipping finalization. One process exits as usual."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits. Left to C++ static destruction, a
    gloo rank that exits while its peers still close their connections can abort ("terminate called
    without an active exception", SIGABRT) after the run finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


# -- one optimiser per player, however the ranks share the work -----------------------------------


class DataParallelEngine:
    """A player's networks on one rank or DDP-wrapped (through Accelerate): gradients are averaged
    at the last micro-step of an accumulation, then clipped and stepped by a torch optimiser."""

    sharded = False  # optimizer state is whole on every rank: it goes into the step file

    def __init__(self, runtime: Runtime, optimizer, modules: list[nn.Module], grad_clip: float | None):
        self.rt, self.optimizer, self.modules, self.grad_clip = runtime, optimizer, modules, grad_clip

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self, last: bool):
        """Context for one micro-batch's forward and backward: DDP reduces only at the last one."""
        return self.rt.no_sync([] if last else self.modules)

    def backward(self, loss: torch.Tensor, micro_steps: int, last: bool) -> None:
        self.rt.backward(loss / micro_steps)

    def step(self, measure_norm: bool = True) -> torch.Tensor | None:
        """Clip (when asked) and step; returns the gradient norm before clipping, or None when neither
        clipping nor ``measure_norm`` asked for it."""
        norm = None
        if self.grad_clip or measure_norm:
            params = [p for m in self.modules for p in m.parameters()]
            norm = self.rt.clip_grad_norm(self.optimizer, params, self.grad_clip or None)
        self.optimizer.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load(self, state: dict[str, Any], sharded_folder, tag: str) -> None:
        self.optimizer.load_state_dict(state)

    def save_sharded(self, folder, tag: str) -> None:
        pass


class DeepSpeedEngine:
    """A player's networks in one DeepSpeed engine (ZeRO-1/2): the engine divides by the accumulation
    steps, reduces partitioned gradients, clips (its gradient_clipping), steps and zeroes them."""

    sharded = True  # each rank's optimizer partition lives in DeepSpeed's files beside the step file

    def __init__(self, modules: dict[str, nn.Module], optimizer, config: dict[str, Any]):
        self.engine = deepspeed_engine(modules, optimizer, config)
        self.optimizer = self.engine.optimizer

    def zero_grad(self) -> None:
        pass

    def micro_step(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro_steps: int, last: bool) -> None:
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # only counts the micro-step; the update happens at the boundary

    def step(self, measure_norm: bool = True) -> torch.Tensor | None:
        self.engine.step()
        if not measure_norm:
            return None
        return torch.tensor(float(self.engine.get_global_grad_norm() or 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any], sharded_folder, tag: str) -> None:
        self.engine.load_checkpoint(str(sharded_folder), tag=tag, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)

    def save_sharded(self, folder, tag: str) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)


def prepare_networks(runtime: Runtime, nets: dict[str, nn.Module], strategy: str) -> dict[str, nn.Module]:
    """The modules players train through: DDP-wrapped where several ranks share trainable parameters,
    bare under DeepSpeed (its engines, built with the optimisers, do their own reductions)."""
    return dict(nets) if strategy == "deepspeed" else {n: runtime.prepare_module(m) for n, m in nets.items()}


def player_engine(runtime: Runtime, strategy: str, modules: dict[str, nn.Module], optimizer, grad_clip,
                  deepspeed: Any, micro: int, accumulation: int):
    """The engine one player steps through: DataParallelEngine, or DeepSpeedEngine for strategy deepspeed
    (``deepspeed``: the job's train.deepspeed section)."""
    if strategy == "deepspeed":
        config = deepspeed_config(deepspeed.zero_stage, deepspeed.offload_optimizer, micro, accumulation,
                                  runtime.world_size, grad_clip)
        return DeepSpeedEngine(modules, optimizer, config)
    return DataParallelEngine(runtime, runtime.prepare_optimizer(optimizer), list(modules.values()), grad_clip)


# -- DeepSpeed ------------------------------------------------------------------------------------
# Driven directly (deepspeed.initialize), not through Accelerate's plugin: Accelerate 1.15's plugin
# refuses to start unless `transformers` is importable, and a GAN needs one engine per player.


def deepspeed_config(stage: int, offload_optimizer: bool, micro: int, accumulation: int,
                     world_size: int, grad_clip: float | None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our own torch.optim optimisers, ZeRO-partitioned
        "zero_force_ds_cpu_optimizer": False,  # offloaded states step with torch's Adam on CPU
        "gradient_clipping": grad_clip or 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """One engine over one player's networks; they stay callable by name through ``engine.module``."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.distributed.is_initialized():  # one process without a launcher: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=nn.ModuleDict(modules), optimizer=optimizer, config=config)
    engine.checkpoint_engine.load = _load_weights_only
    return engine


def _load_weights_only(path: str, map_location=None):
    """DeepSpeed's own loader unpickles with weights_only=False. Its files hold tensors, plain data
    and these three small DeepSpeed types, so they load weights-only like our step files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- seeding and RNG state (per rank) ----------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def node_name() -> str:
    """SLURM's name for this node (several slurmd may share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class StopRequest:
    """Turns stop signals into a flag the training loop polls between steps.

    SIGTERM (``kill``, ``scancel``, a launcher shutting down) and SIGINT (Ctrl-C) ask for
    checkpoint-and-exit; SIGUSR2 (SLURM's warning before the time limit or a preemption, sent with
    ``--signal``) for checkpoint-and-requeue. The loop agrees on the flag across ranks, so every rank
    stops after the same step and the checkpoint is written collectively. Repeats are ignored: under
    a launcher one Ctrl-C reaches a rank several times (from the terminal, then forwarded). The
    previous handlers are kept for whoever requeues afterwards, and restored by ``uninstall``.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        import sys
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (a run started from a worker thread)
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        entry = sys.modules.get("gensuite.slurm_entry")
        for signum in getattr(entry, "received", []):  # arrived while the task was still starting
            self._handle(signum, None)
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def ignore_further(self) -> None:
        """Once stopping, a repeated warning must not interrupt the checkpoint or the requeue."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def requeue(self) -> bool:
        return self.signal == signal.SIGUSR2


# -- several local ranks -------------------------------------------------------------------------


def run_ranks(nproc: int, args: list[str]) -> int:
    """torchrun's agent in this process: ``nproc`` ranks of ``python ARGS`` over gloo on this machine.

    A stop signal to this process reaches every rank once (torchrun forwards it), each checkpoints
    and the ranks report in one line; this returns 128 + the signal instead of torchrun's traceback.
    Ranks that all refused bad input (exit code 2, their line already printed) return 2 the same way.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # The agent logs each rank it shuts down; the ranks have said why already. Unexpected failures
    # still end in torchrun's table below.
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", *args])
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        expected = codes & ({2} | {128 + s for s in StopRequest.SIGNALS})
        # The agent stops the other ranks once one has ended: those show as killed (negative codes).
        if expected and all(c in expected or c < 0 for c in codes):
            return max(expected)
        raise
    finally:
        elastic.setLevel(level)
    return 0


if __name__ == "__main__":  # python -m gensuite.distributed NPROC ARGS...: what the launchers run
    sys.exit(run_ranks(int(sys.argv[1]), sys.argv[2:]))
