"""The training loop end to end on real shards: every family, exact resume, TensorBoard, NaN stop."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from gensuite import checkpoint as ckpt
from gensuite.config import job_from_dict
from gensuite.data.shards import data_spec, read_manifest
from gensuite.errors import TrainingDiverged
from gensuite.registry import families
from gensuite.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def make_job(shard_root, family="gan", flavor="debug", dataset="digits", **train_kw):
    train_cfg = dict(steps=6, batch_size=16, log_every=2, sample_every=3, checkpoint_every=3, seed=3)
    train_cfg.update(train_kw)
    return job_from_dict({"name": f"{family}-test", "family": family, "flavor": flavor,
                          "data": {"dataset": dataset, "root": str(shard_root), "shuffle_buffer": 64},
                          "train": train_cfg, "log": {"grid_size": 16, "progress_bar": False}})


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_debug_flavor_trains_through_the_loop(shard_root, tmp_path, name):
    cls = families()[name]
    assert "debug" in cls.flavors, f"family {name} needs a debug flavor"
    job = make_job(shard_root, name, dataset=cls.debug_dataset, steps=4, checkpoint_every=4)
    metrics = train(job, tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004.pt"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 4 and state["config"]["family"] == name
    losses = {k: v for k, v in metrics.items() if k.endswith("/loss")}
    assert losses and all(math.isfinite(v) for v in losses.values())
    assert list((tmp_path / "samples").glob("*-00000004.png"))  # its visuals (grids or figures)
    # Validation curves (no eval.every: at the last step): every player's objective on held-out data, each
    # term paired with the training curve of the same name, finite.
    acc = events(tmp_path)
    logged = set(acc.Tags()["scalars"])
    validation = {t: acc.Scalars(t) for t in logged if t.startswith("val/")}
    players = [p.name for p in cls(job.model, data_spec(read_manifest(shard_root / cls.debug_dataset))).players()]
    assert {f"val/{p}/loss" for p in players} <= validation.keys()
    for tag, values in validation.items():
        assert tag.removeprefix("val/") in logged, tag
        assert [e.step for e in values] == [4] and math.isfinite(values[0].value), tag


def _params(run_dir):
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    return state


def _assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("family, extra", [
    ("gan", dict(ema={"networks": ["G"], "decay": 0.9}, micro_batch_size=8)),
    ("vae", dict()),
])
def test_resume_is_bitwise_identical(shard_root, tmp_path, family, extra):
    n = 5  # resume mid-epoch
    straight = tmp_path / "straight"
    train(make_job(shard_root, family, steps=2 * n, checkpoint_every=100, **extra), straight)
    split = tmp_path / "split"
    train(make_job(shard_root, family, steps=n, checkpoint_every=100, **extra), split)
    train(make_job(shard_root, family, steps=2 * n, checkpoint_every=100, **extra), split)
    a, b = _params(straight), _params(split)
    assert a["step"] == b["step"] == 2 * n
    for key in ("networks", "ema", "optimizers", "family", "data", "rng"):
        _assert_bitwise_equal(a[key], b[key], key)
    # The comparison can fail: one more step changes the parameters.
    train(make_job(shard_root, family, steps=2 * n + 1, checkpoint_every=100, **extra), split)
    c = _params(split)
    assert any(not torch.equal(c["networks"][k][p], a["networks"][k][p])
               for k in a["networks"] for p in a["networks"][k] if a["networks"][k][p].is_floating_point())


def test_resume_across_an_epoch_boundary(shard_root, tmp_path):
    # digits: 1500 train samples / 400 = 3 batches per epoch; resume at step 4 is inside epoch 1.
    kw = dict(batch_size=400, checkpoint_every=100)
    train(make_job(shard_root, "vae", steps=8, **kw), tmp_path / "a")
    train(make_job(shard_root, "vae", steps=4, **kw), tmp_path / "b")
    train(make_job(shard_root, "vae", steps=8, **kw), tmp_path / "b")
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a["data"]["epoch"] == b["data"]["epoch"] == 2
    _assert_bitwise_equal(a["networks"], b["networks"], "networks")


def test_tensorboard_event_file_reads_back(shard_root, tmp_path):
    train(make_job(shard_root, "gan", steps=6, log_every=2, sample_every=3), tmp_path)
    acc = events(tmp_path)
    tags = acc.Tags()
    for tag in ("D/loss", "G/loss", "D/grad_norm", "G/grad_norm", "lr/D", "lr/G", "perf/samples_per_sec"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6], tag
    assert [e.step for e in acc.Images("samples/samples")] == [3, 6]
    assert "config/text_summary" in tags["tensors"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "family: gan" in config_text and "batch_size: 16" in config_text
    assert acc.Scalars("lr/D")[0].value == pytest.approx(2e-4)
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= hparams.keys()
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["model.loss"].string_value == "non_saturating" and start["train.batch_size"].number_value == 16
    assert [e.step for e in acc.Scalars("final/G/loss")] == [6]
    from PIL import Image

    gif = Image.open(tmp_path / "samples" / "samples.gif")
    assert gif.n_frames == 2  # the grids of steps 3 and 6


def test_log_only_diagnostics_are_measured_on_the_steps_that_log_them(shard_root, tmp_path, monkeypatch):
    # A gradient norm is a pass over every gradient and G/dead_units hooks every activation: with nothing
    # to clip, both are taken on the log steps only and logged as that step's own value.
    from gensuite.distributed import DataParallelEngine

    seen = []  # per player step: (measure_norm, the returned norm, the gradients' norm in float64)
    step = DataParallelEngine.step

    def spy(self, measure_norm=True):
        grads = [p.grad.double() for m in self.modules for p in m.parameters() if p.grad is not None]
        exact = math.sqrt(sum(float((g * g).sum()) for g in grads))
        norm = step(self, measure_norm)
        seen.append((measure_norm, None if norm is None else norm.item(), exact))
        return norm

    monkeypatch.setattr(DataParallelEngine, "step", spy)
    train(make_job(shard_root, "gan", steps=7, log_every=3, sample_every=100), tmp_path)
    log_steps = [3, 6, 7]  # every log_every steps, and the last
    assert [measured for measured, _, _ in seen] == [s in log_steps for s in range(1, 8) for _player in "DG"]
    assert all(norm is None for measured, norm, _ in seen if not measured)
    acc = events(tmp_path)
    for tag, player in (("D/grad_norm", 0), ("G/grad_norm", 1)):
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == log_steps
        for e in logged:
            _, norm, exact = seen[2 * (e.step - 1) + player]
            assert e.value == norm  # the step's float32 norm, not an average over steps
            # float32 sums of squares over ~10^4 gradients: relative error ~ log2(10^4) x 6e-8 ≈ 1e-6
            assert norm == pytest.approx(exact, rel=1e-5)
    assert [e.step for e in acc.Scalars("G/dead_units")] == log_steps


def test_cpu_runs_keep_freed_blocks_in_the_heap_for_the_next_step():
    # glibc maps any block over 32 MiB afresh (and unmaps it when freed), so every step would fault its
    # pages in again; with the runtime's thresholds it comes from the heap (below the program break) and
    # the break stays where it is when the block is freed (no trim).
    script = """
import ctypes, torch
from gensuite.distributed import Runtime
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
def program_break():
    return libc.sbrk(0)
block = torch.ones(10 << 20)  # 40 MiB
mapped_by_default = block.data_ptr() > program_break()
del block
Runtime(cpu=True)  # a CPU run's runtime sets the thresholds
block = torch.ones(10 << 20)
on_heap, top = block.data_ptr() < program_break(), program_break()
del block
print(mapped_by_default, on_heap, program_break() == top)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


def test_resume_purges_events_logged_after_the_checkpoint(shard_root, tmp_path):
    train(make_job(shard_root, "vae", steps=6, log_every=1, checkpoint_every=4, keep_checkpoints=5), tmp_path)
    # Simulate a crash after step 6 whose last checkpoint was step 4.
    ckpt.checkpoint_dir(tmp_path).joinpath("step-00000006.pt").unlink()
    train(make_job(shard_root, "vae", steps=8, log_every=1, checkpoint_every=4, keep_checkpoints=5), tmp_path)
    steps = [e.step for e in events(tmp_path).Scalars("model/loss")]
    assert steps == list(range(1, 9))


def test_checkpoints_are_rotated_and_load_weights_only(shard_root, tmp_path):
    train(make_job(shard_root, "vae", steps=8, checkpoint_every=2, keep_checkpoints=2), tmp_path)
    folder = ckpt.checkpoint_dir(tmp_path)
    (folder / ".step-00000010.pt.tmp-123").write_bytes(b"half written")  # an interrupted save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000006.pt", "step-00000008.pt"]
    state = torch.load(ckpt.latest_checkpoint(tmp_path), weights_only=True)
    assert state["gensuite_version"] and len(state["rng"]) == 1
    assert {"networks", "optimizers", "schedulers", "ema", "data", "config"} <= state.keys()


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(shard_root, tmp_path):
    trainer = Trainer(make_job(shard_root, "vae", steps=10, checkpoint_every=2), tmp_path)
    real_loss = trainer.family.loss

    def loss(player, nets, batch, step):
        terms = real_loss(player, nets, batch, step)
        if step == 5:
            terms["kl"] = terms["kl"] * float("nan")
            terms["loss"] = terms["loss"] + terms["kl"]
        return terms

    trainer.family.loss = loss
    with pytest.raises(TrainingDiverged, match=r"step 5: loss term model/(loss|kl) is nan.*step-00000004\.pt"):
        trainer.run()
    trainer.logger.close()
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert last["step"] == 4
    assert all(torch.isfinite(t).all() for net in last["networks"].values() for t in net.values())


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu picks Accelerate's torchrun-based launcher; without a GPU it runs on gloo.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
    # Without --multi_gpu, Accelerate's CPU path starts one process; gensuite.train starts the rest.
    "accelerate-cpu": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_training(shard_root, tmp_path, launcher):
    job = tmp_path / "job.yaml"
    job.write_text(f"family: gan\nflavor: debug\ndata: {{dataset: digits, root: {shard_root}}}\n"
                   "train: {steps: 4, batch_size: 16, checkpoint_every: 4, log_every: 2}\nlog: {progress_bar: false}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*LAUNCHERS[launcher], "-m", "gensuite.train", str(job), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 4 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank seeding
    assert "global batch 16 = 2 ranks x 1 x 8" in result.stderr


@pytest.mark.slow
def test_deepspeed_bf16_single_process_resumes_from_weights_only_files(shard_root, tmp_path):
    # One process without a launcher, bf16 autocast over ZeRO-2's fp32 weights, optimizer offload;
    # the resume reads DeepSpeed's partition files through the weights-only loader.
    job = tmp_path / "job.yaml"
    job.write_text(f"family: vae\nflavor: debug\ndata: {{dataset: digits, root: {shard_root}}}\n"
                   "train: {steps: 4, batch_size: 16, checkpoint_every: 4, log_every: 2, precision: bf16, "
                   "strategy: deepspeed, deepspeed: {zero_stage: 2, offload_optimizer: true}}\n"
                   "log: {progress_bar: false}\n")
    cmd = [sys.executable, "-m", "gensuite.train", str(job), "--run-dir", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*cmd, "--set", "train.steps=8"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 8 and state["strategy"] == "deepspeed" and state["optimizers"] == {}
    weights = [t for net in state["networks"].values() for t in net.values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights)
    loss = events(tmp_path / "run").Scalars("model/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8] and all(math.isfinite(e.value) for e in loss)


def test_lr_schedules_warm_up_then_decay_to_zero():
    from gensuite.config import OptimizerSpec
    from gensuite.trainer import lr_factor

    cosine = lr_factor(OptimizerSpec(schedule="cosine", warmup_steps=4), total_steps=104)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(54) == pytest.approx(0.5) and cosine(104) == pytest.approx(0.0, abs=1e-12)
    linear = lr_factor(OptimizerSpec(schedule="linear"), total_steps=10)
    assert [round(linear(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(OptimizerSpec(), total_steps=10)(7) == 1.0


def test_global_batch_is_split_across_ranks_and_accumulation():
    from gensuite.errors import ConfigError
    from gensuite.trainer import BatchPlan

    job = make_job("unused", batch_size=64, micro_batch_size=8)
    assert BatchPlan.of(job, world_size=4) == BatchPlan(64, 16, 8, 2)
    assert BatchPlan.of(make_job("unused", batch_size=64), world_size=2) == BatchPlan(64, 32, 32, 1)
    with pytest.raises(ConfigError, match="train.batch_size: 64 is not divisible by the 3 ranks"):
        BatchPlan.of(job, world_size=3)


def test_accumulated_micro_batches_give_the_full_batch_gradient(shard_root, tmp_path, monkeypatch):
    import gensuite.families.vae as vae_family

    # Deterministic latent (z = posterior mean) and plain SGD: the update is lr x the gradient.
    monkeypatch.setattr(vae_family, "reparameterize", lambda mean, log_var: mean)
    results = {}
    for name, micro in (("full", None), ("micro", 4)):
        job = make_job(shard_root, "vae", steps=1, checkpoint_every=1, micro_batch_size=micro)
        job.optim.name, job.optim.lr = "sgd", 0.1
        train(job, tmp_path / name)
        results[name] = _params(tmp_path / name)
    assert results["micro"]["data"]["micro_batches"] == 4 and results["full"]["data"]["micro_batches"] == 1
    a, b = results["full"]["networks"], results["micro"]["networks"]
    torch.manual_seed(3)  # make_job's seed: the initial weights of both runs
    fam = families()["vae"](make_job(shard_root, "vae").model, _spec(shard_root))
    init = {k: v.state_dict() for k, v in fam.build_networks().items()}
    moved = 0.0
    for net in a:
        for p in a[net]:
            assert torch.allclose(a[net][p], b[net][p], atol=1e-6), f"{net}.{p}"
            moved = max(moved, (a[net][p] - init[net][p]).abs().max().item())
    assert moved > 1e-3  # the step really changed the weights


def _spec(shard_root):
    from gensuite.data.shards import data_spec, read_manifest

    return data_spec(read_manifest(Path(shard_root) / "digits"))


def test_grad_clip_and_ema_and_bf16(shard_root, tmp_path):
    job = make_job(shard_root, "gan", steps=4, precision="bf16", ema={"networks": ["G"], "decay": 0.5})
    job.optim.grad_clip = 1e-3
    metrics = train(job, tmp_path)
    assert metrics["final/D/grad_norm"] > 1e-3  # logged before clipping
    state = _params(tmp_path)
    ema, g = state["ema"]["G"], state["networks"]["G"]
    assert int(ema["n_averaged"]) == 4
    diffs = [(ema[f"module.{k}"] - v).abs().max().item() for k, v in g.items() if v.is_floating_point()]
    assert max(diffs) > 0  # the average lags the weights


def test_frozen_networks_load_from_another_runs_checkpoint(shard_root, tmp_path):
    from gensuite.trainer import load_network

    train(make_job(shard_root, "gan", steps=2, checkpoint_every=2, ema={"networks": ["G"], "decay": 0.5}), tmp_path)
    state = _params(tmp_path)
    weights = load_network(str(tmp_path), "G")  # a run directory: its latest checkpoint, EMA weights preferred
    ema = {k.removeprefix("module."): v for k, v in state["ema"]["G"].items() if k != "n_averaged"}
    _assert_bitwise_equal(weights, ema)
    assert load_network(str(ckpt.latest_checkpoint(tmp_path)), "D").keys() == state["networks"]["D"].keys()
    from gensuite.errors import GensuiteError

    with pytest.raises(GensuiteError, match="has no network 'H'"):
        load_network(str(tmp_path), "H")


def test_ema_warmup_follows_its_formula():
    """train.ema.warmup: decay_n = min(decay, (1 + n) / (10 + n)) at the update after n earlier ones."""
    from types import SimpleNamespace

    from torch.optim.swa_utils import AveragedModel

    from gensuite.config import EmaConfig
    from gensuite.trainer import Trainer

    host = SimpleNamespace(job=SimpleNamespace(train=SimpleNamespace(ema=EmaConfig(decay=0.99, warmup=True))), step=0)
    net = torch.nn.Linear(1, 1, bias=False)
    avg = AveragedModel(net, multi_avg_fn=Trainer._ema_average(host), use_buffers=True)
    expected = None
    for step in range(1, 40):
        host.step = step
        net.weight.data.fill_(float(step))
        avg.update_parameters(net)
        n = step - 1
        decay = min(0.99, (1 + n) / (10 + n))
        expected = float(step) if step == 1 else decay * expected + (1 - decay) * float(step)
        # float32 lerps vs a float64 recursion: at most 39 roundings of ~6e-8 relative each
        assert avg.module.weight.item() == pytest.approx(expected, rel=39 * 6e-8)
