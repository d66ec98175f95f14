"""Job files: every shipped job validates; malformed ones give one-line errors and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from gensuite.config import job_from_dict, load_job
from gensuite.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))

GOOD = """\
family: vae
flavor: debug
data: {dataset: digits}
train: {steps: 10, batch_size: 16}
"""


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gensuite", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT)


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_shipped_job_validates(job):
    cfg = load_job(job)
    assert cfg.name == job.stem
    assert cfg.train.batch_size >= 1


def test_there_are_jobs_for_the_issue():
    names = {j.stem for j in JOBS}
    assert {"demo", "vae_mnist", "cvae_mnist", "gan_mnist", "dcgan_mnist", "dcgan_cifar10"} <= names
    assert any(n.endswith("_digits") for n in names)


def test_good_job_loads_with_types_and_overrides(tmp_path):
    job = load_job(write(tmp_path, GOOD + "optim: {lr: 2e-4, betas: [0.5, 0.999]}\n"),
                   ["train.steps=30", "train.precision=no", "model.beta=4"])
    assert job.train.steps == 30 and job.optim.lr == 2e-4 and job.optim.betas == (0.5, 0.999)
    assert job.model.beta == 4.0 and isinstance(job.model.beta, float)
    assert job.train.precision == "no"  # YAML's bare `no` is False; it still means "no"
    assert job.name == "job"


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("steps: 10", "setps: 10"), "train.setps: unknown key; did you mean train.steps?"),
    (GOOD.replace("steps: 10", "steps: ten"), "train.steps: expected an integer, got str 'ten'"),
    (GOOD.replace("steps: 10", "steps: 0"), "train.steps: must be >= 1"),
    (GOOD.replace("family: vae", "family: vea"), "family: unknown family 'vea'; did you mean vae?"),
    (GOOD.replace("flavor: debug", "flavor: debgu"), "flavor: unknown flavor 'debgu' for family vae; did you mean debug?"),
    (GOOD + "optim: {name: adma}\n", "optim.name: invalid value 'adma'; did you mean adam?"),
    (GOOD + "model: {latnt_dim: 3}\n", "model.latnt_dim: unknown key; did you mean model.latent_dim?"),
    (GOOD + "train2: {}\n", "train2: unknown key; did you mean train?"),
])
def test_bad_fields_name_the_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, text))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("steps: 10", "setps: 10"), "train.setps: unknown key; did you mean train.steps?"),
    (GOOD.replace("batch_size: 16", "batch_size: [16]"), "train.batch_size: expected an integer"),
    (GOOD.replace("family: vae", "family: nope"), "family: unknown family 'nope'"),
    ("family: vae\nflavor: [debug\n", "YAML syntax error"),
    ("", "empty job file"),
])
def test_cli_validate_one_line_error_exit_2(tmp_path, text, expected):
    result = cli("validate", write(tmp_path, text))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_shards_name_the_build_command(tmp_path):
    job = write(tmp_path, GOOD.replace("dataset: digits", "dataset: mnist, root: " + str(tmp_path / "none")))
    for args in (("validate", "--data", job), ("train", job, "--run-dir", tmp_path / "run")):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and "python shards/build.py mnist" in line and "Traceback" not in line


def test_cli_validate_all_shipped_jobs():
    result = cli("validate", *JOBS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(JOBS)


def test_summary_prints_architectures_and_parameter_counts(tmp_path):
    import json

    from gensuite.families.gan import GAN, GANConfig
    from gensuite.config import from_dict
    from gensuite.registry import DataSpec

    result = cli("summary", ROOT / "jobs" / "dcgan_cifar10.yaml", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data_shape"] == [3, 32, 32] and set(report["networks"]) == {"G", "D"}
    nets = GAN(from_dict(GANConfig, {**GAN.flavors["dcgan"], "latent_dim": 100}, "model"),
               DataSpec("cifar10", "image", (3, 32, 32), 10)).build_networks()
    for name, net in nets.items():
        assert report["networks"][name]["parameters"] == sum(p.numel() for p in net.parameters())
    assert "ConvTranspose2d" in report["networks"]["G"]["architecture"]
    text = cli("summary", ROOT / "jobs" / "vae_mnist.yaml")
    assert text.returncode == 0 and "== encoder:" in text.stdout and "total:" in text.stdout


# -- launch and sweep sections ------------------------------------------------------------------

def _job(**sections):
    raw = {"family": "gan", "flavor": "debug", "name": "j", "train": {"steps": 4}}
    raw.update(sections)
    return job_from_dict(raw)


def test_sweep_expands_grid_times_sets_with_named_run_dirs(tmp_path):
    from gensuite.sweep import expand

    job = _job(sweep={"grid": {"model.loss": ["minimax", "non_saturating"], "optim.lr": [1e-4, 2e-4]},
                      "sets": [{"train.seed": 0}, {"train.seed": 1}]})
    tasks = expand(job, tmp_path)
    assert len(tasks) == 8
    assert tasks[0].run_dir == tmp_path / "loss=minimax,lr=0.0001,seed=0"
    assert tasks[-1].run_dir == tmp_path / "loss=non_saturating,lr=0.0002,seed=1"
    assert [(t.job.model.loss, t.job.optim.lr, t.job.train.seed) for t in tasks[:3]] == [
        ("minimax", 1e-4, 0), ("minimax", 1e-4, 1), ("minimax", 2e-4, 0)]
    assert all(t.job.sweep.grid == {} for t in tasks)
    assert expand(_job(), tmp_path)[0].run_dir == tmp_path  # no sweep: the run root itself


def test_sweep_errors_name_their_source(tmp_path):
    from gensuite.sweep import expand

    with pytest.raises(ConfigError, match=r"^sweep.grid: model.loss: unknown loss 'hinj'"):
        expand(_job(sweep={"grid": {"model.loss": ["hinj"]}}), tmp_path)
    with pytest.raises(ConfigError, match=r"^sweep.sets\[1\]: train.setps: unknown key; did you mean train.steps"):
        expand(_job(sweep={"sets": [{"train.seed": 1}, {"train.setps": 3}]}), tmp_path)
    with pytest.raises(ConfigError, match="share the directory"):
        expand(_job(sweep={"sets": [{"train.seed": 1}, {"train.seed": 1}]}), tmp_path)
    with pytest.raises(ConfigError, match="not launch"):
        expand(_job(sweep={"grid": {"launch.nodes": [1, 2]}}), tmp_path)


@pytest.mark.parametrize("launch, message", [
    ({"partition": "gpu;reboot"}, "launch.partition: 'gpu;reboot' is refused"),
    ({"account": "a\nb"}, "launch.account"),
    ({"qos": "$(id)"}, "launch.qos"),
    ({"constraint": "a100`id`"}, "launch.constraint"),
    ({"setup": ["module load x\nrm -rf ~"]}, r"launch.setup\[0\]"),
    ({"sbatch_args": {"mail type": "END"}}, "launch.sbatch_args.mail type"),
    ({"sbatch_args": {"comment": "a\nb"}}, "launch.sbatch_args.comment"),
    ({"nodes": 0}, "launch.nodes: must be >= 1"),
    ({"timeout_min": 1, "signal_delay_s": 90}, "launch.signal_delay_s"),
    ({"partion": "gpu"}, "launch.partion: unknown key; did you mean launch.partition"),
])
def test_launch_values_are_checked(launch, message):
    with pytest.raises(ConfigError, match=message):
        _job(launch=launch)


def test_launch_defaults_and_derived_values():
    job = _job(launch={"nodes": 2, "gpus_per_node": 4, "timeout_min": 1})
    assert (job.launch.ranks_per_node, job.launch.world_size, job.launch.signal_delay) == (4, 8, 30)
    assert _job().launch.world_size == 1 and _job().launch.signal_delay == 90


def test_deepspeed_stage_3_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="train.deepspeed.zero_stage: 3 is not supported; use 1"):
        _job(train={"steps": 4, "strategy": "deepspeed", "deepspeed": {"zero_stage": 3}})


@pytest.mark.parametrize("family, key, value, message", [
    ("vae", "decoder_hidden", [32, 0], "model.decoder_hidden: layer widths must be >= 1"),
    ("vae", "conv_channels", [0], "model.conv_channels: layer widths must be >= 1"),
    ("stackgan", "res_blocks", -1, "model.res_blocks: must be >= 0"),
    ("diffusion", "timesteps", 0, "model.timesteps: must be >= 1"),
])
def test_a_bad_model_setting_is_named_exactly(family, key, value, message):
    with pytest.raises(ConfigError) as caught:
        job_from_dict({"family": family, "flavor": "debug", "model": {key: value}})
    assert str(caught.value) == message
