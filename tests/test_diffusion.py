"""The diffusion family through the suite: samplers chosen at sampling and evaluation time, the
variational bound through the likelihood ability, the assignment's figures, the NCSN objective and
Ho et al.'s CIFAR-10 network size. The mathematics is in test_diffusion_math.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gensuite.config import EvalConfig, job_from_dict
from gensuite.errors import ConfigError, GensuiteError
from gensuite.registry import HasLikelihood, HasSamplers, SamplerChoice

ROOT = Path(__file__).resolve().parents[1]
GENSUITE = [sys.executable, "-m", "gensuite"]


def diffusion_job(shard_root, **model):
    return job_from_dict({
        "name": "diffusion-test", "family": "diffusion", "flavor": "debug",
        "data": {"dataset": "digits", "root": str(shard_root), "shuffle_buffer": 64},
        "model": {"timesteps": 20, **model},
        "train": {"steps": 2, "batch_size": 16, "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "seed": 1},
        "eval": {"metrics": ["likelihood"], "max_samples": 8, "importance_samples": 4},
        "log": {"grid_size": 4, "progress_bar": False}})


@pytest.fixture(scope="module")
def ddpm_run(shard_root, tmp_path_factory):
    from gensuite.trainer import train

    run = tmp_path_factory.mktemp("ddpm") / "run"
    metrics = train(diffusion_job(shard_root), run)
    return run, metrics


def test_a_ddpm_run_logs_the_bound_and_the_assignments_figures(ddpm_run):
    run, metrics = ddpm_run
    # A bound on the probability of 8-bit pixels: -log P >= 0, so the bound is negative; bits/dim are
    # its nats over 16 x 16 dimensions and ln 2.
    import math

    assert metrics["final/eval/vlb"] < 0 and math.isfinite(metrics["final/eval/vlb"])
    assert metrics["final/eval/vlb_bpd"] == pytest.approx(-metrics["final/eval/vlb"] / (256 * math.log(2)), rel=1e-12)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    for figure in ("figures/forward_process", "figures/reverse_process", "figures/ddim_inversion"):
        assert figure in images, images
    assert "== model: " in (run / "architecture.txt").read_text()


def test_samplers_are_chosen_at_sampling_time_and_reproducible(ddpm_run):
    from gensuite.sampling import draw, load_run

    run = load_run(ddpm_run[0])
    assert isinstance(run.family, HasSamplers) and run.family.samplers == ("ddpm", "ddim")
    ddim = draw(run, 4, seed=1, sampler=SamplerChoice("ddim", 5, 0.0))
    assert run.family.sampler == SamplerChoice("ddim", 5, 0.0)
    assert torch.equal(ddim, draw(run, 4, seed=1))  # η = 0 from the same x_T: the same images
    noisy = draw(run, 4, seed=1, sampler=SamplerChoice(eta=1.0))  # steps kept, η changed
    assert run.family.sampler == SamplerChoice("ddim", 5, 1.0) and not torch.equal(noisy, ddim)
    ancestral = draw(run, 4, seed=1, sampler=SamplerChoice("ddpm"))
    assert torch.equal(ancestral, draw(run, 4, seed=1)) and ancestral.shape == (4, 1, 16, 16)
    assert 0.0 <= float(ancestral.min()) and float(ancestral.max()) <= 1.0
    with pytest.raises(GensuiteError, match=r"^--sampler: langevin does not sample a ddpm model; use ddpm or ddim$"):
        run.family.use_sampler(SamplerChoice("langevin"))
    with pytest.raises(ConfigError, match=r"must be in \[0, 20\]"):
        run.family.use_sampler(SamplerChoice("ddim", 50))


def test_gensuite_sample_takes_the_sampler_and_refuses_it_in_one_line(ddpm_run, tmp_path):
    out = tmp_path / "ddim.png"
    done = subprocess.run([*GENSUITE, "sample", str(ddpm_run[0]), "--n", "4", "--sampler", "ddim", "--steps", "5",
                           "--eta", "0", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and out.is_file(), done.stderr
    done = subprocess.run([*GENSUITE, "sample", str(ddpm_run[0]), "--sampler", "langevin"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --sampler: langevin does not sample a ddpm model; use ddpm or ddim"]


def test_eval_names_the_sampler_and_the_model_keeps_its_own(shard_root, ddpm_run):
    from gensuite import evaluation
    from gensuite.data.shards import data_spec, open_shard_set
    from gensuite.families.gan import GAN
    from gensuite.sampling import load_run

    family = load_run(ddpm_run[0]).family
    cfg = EvalConfig(metrics=["likelihood"], sampler="ddim", sampler_steps=4, sampler_eta=0.5)
    with evaluation.evaluation_sampler(cfg, family):
        assert family.sampler == SamplerChoice("ddim", 4, 0.5)
    assert family.sampler == SamplerChoice("ddpm", 0, 0.0)
    with pytest.raises(ConfigError, match=r"^eval.sampler: ddim does not sample|^eval.sampler: .*must be in"):
        evaluation.resolve(EvalConfig(sampler="ddim", sampler_steps=99), family)
    gan = GAN(GAN.config_class(), data_spec(open_shard_set(shard_root / "digits")))
    with pytest.raises(ConfigError, match=r"^eval.sampler: the gan family has one sampler"):
        evaluation.resolve(EvalConfig(sampler="ddim"), gan)


def test_the_bound_of_a_sample_depends_on_its_seed_not_its_batch(ddpm_run, shard_root):
    """The likelihood metric adds per-sample values across ranks: sample i's bound must not depend on
    which other samples share its batch. With k ≥ T − 1 every KL term is computed (no timestep draws)."""
    from gensuite.data.pipeline import read_split
    from gensuite.sampling import load_run

    run = load_run(ddpm_run[0])
    assert isinstance(run.family, HasLikelihood) and run.family.likelihood_values == ("vlb",)
    batch = read_split(shard_root / "digits", "test", 4)
    seeds = torch.tensor([11, 12, 13, 14])
    together = run.family.log_likelihood(run.networks, batch, 19, seeds)["vlb"]
    alone = torch.cat([run.family.log_likelihood(run.networks, {"x": batch["x"][i:i + 1]}, 19, seeds[i:i + 1])["vlb"]
                       for i in range(4)])
    # float32 convolutions over batches of different sizes: ~1e-7 relative per term, 20 terms.
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0.0)
    again = run.family.log_likelihood(run.networks, batch, 19, seeds)["vlb"]
    assert torch.equal(together, again)
    estimate = run.family.log_likelihood(run.networks, batch, 3, seeds)["vlb"]  # 3 of the 19 KL terms, scaled
    assert torch.isfinite(estimate).all() and not torch.equal(estimate, together)


def test_ncsn_trains_by_denoising_score_matching_and_samples_by_langevin(shard_root, tmp_path):
    from gensuite.sampling import draw, load_run
    from gensuite.trainer import train

    job = diffusion_job(shard_root, objective="ncsn", sampler="langevin")
    job = job_from_dict({**job.to_dict(), "eval": {"metrics": []}})
    metrics = train(job, tmp_path / "ncsn")
    assert torch.isfinite(torch.tensor(metrics["final/model/loss"]))
    run = load_run(tmp_path / "ncsn")
    assert run.family.likelihood_values == () and run.family.samplers == ("langevin",)
    samples = draw(run, 4, seed=2)
    assert samples.shape == (4, 1, 16, 16) and torch.equal(samples, draw(run, 4, seed=2))
    with pytest.raises(ConfigError, match=r"^model.sampler: ddim does not sample a ncsn model; use langevin$"):
        diffusion_job(shard_root, objective="ncsn", sampler="ddim")


def test_summary_prints_hos_cifar10_network_size_next_to_the_papers():
    done = subprocess.run([*GENSUITE, "summary", "jobs/ddpm_cifar10.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == \
        "total: 35,746,307 parameters (35.7M; the paper: 35.7M (Ho et al. 2020, table in appendix B))"


def test_a_finished_run_is_evaluated_again_with_another_sampler(shard_root, ddpm_run, tmp_path):
    """What each task of jobs/ddim_sampling_sweep.yaml does: resume another run's final checkpoint
    with nothing left to train, and evaluate it with this job's sampler."""
    from gensuite.trainer import train

    run, first = ddpm_run
    job = diffusion_job(shard_root).to_dict()
    job["train"]["resume"] = str(run)
    job["eval"].update(sampler="ddim", sampler_steps=5, sampler_eta=0.0)
    metrics = train(job_from_dict(job), tmp_path / "ddim5")
    assert metrics["final/eval/vlb"] == first["final/eval/vlb"]  # the same weights, seeds and samples
    acc = EventAccumulator(str(tmp_path / "ddim5" / "tb"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    protocol = acc.Tensors("eval/protocol/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "generated samples drawn with ddim, 5 steps, η=0" in protocol
    assert "figures/reverse_process" in acc.Tags()["images"]


def test_classifier_free_guidance_draws_one_row_per_class_and_w0_is_the_conditional_model(shard_root):
    from gensuite.data.shards import data_spec, open_shard_set
    from gensuite.families.diffusion import Diffusion, DiffusionConfig
    from gensuite.registry import Networks

    spec = data_spec(open_shard_set(shard_root / "digits"))
    cfg = DiffusionConfig(**{**Diffusion.flavors["debug"], "class_conditional": True, "sampler": "ddim",
                             "sample_steps": 4})
    family = Diffusion(cfg, spec)
    torch.manual_seed(0)
    nets = family.build_networks()
    for p in nets["model"].parameters():  # away from the zero-initialised output, so labels matter
        p.data.normal_(0, 0.05)
    nets = Networks(nets)
    fixed = family.fixed_inputs(20, torch.Generator().manual_seed(1))
    assert fixed["y"].tolist() == [c for c in range(10) for _ in range(2)] and family.grid_nrow(20) == 2
    plain = family.sample(nets, fixed)
    model = nets["model"]
    x_T, y = fixed["x_T"], fixed["y"]
    t = torch.full((20,), 7)
    by_hand = 3.0 * model(x_T, t, y) - 2.0 * model(x_T, t, torch.full_like(y, 10))  # w = 2, null class 10
    family.cfg.guidance_scale = 2.0
    guided_fn = family._model_fn(nets, y)
    torch.testing.assert_close(guided_fn(x_T, t), by_hand, rtol=1e-5, atol=1e-6)  # one batch of 2N vs two of N
    guided = family.sample(nets, fixed)
    assert not torch.equal(plain, guided)
    family.cfg.guidance_scale = 0.0
    assert torch.equal(family.sample(nets, fixed), plain)


def test_a_unet_that_does_not_fit_the_images_is_refused_with_the_fix(shard_root):
    from gensuite.data.shards import data_spec, open_shard_set
    from gensuite.families.diffusion import Diffusion, DiffusionConfig

    spec = data_spec(open_shard_set(shard_root / "digits"))  # 16 px
    debug = Diffusion.flavors["debug"]
    with pytest.raises(ConfigError, match=r"^model.attention_resolutions: \[4\] is not a side of this U-Net on 16 px "
                                          r"images \(its sides: 16, 8\); choose among those"):
        Diffusion(DiffusionConfig(**{**debug, "attention_resolutions": [4]}), spec)
    with pytest.raises(ConfigError, match=r"^model.channel_mults: 6 levels halve the side 5 times; 16 px is not "
                                          r"divisible by 32; rebuild the shards with: python shards/build.py digits"):
        Diffusion(DiffusionConfig(**{**debug, "channel_mults": [1] * 6}), spec)
