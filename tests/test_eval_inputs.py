"""`gensuite fid` and Inception evaluation given bad inputs: one `error:` line naming the file, exit code 2.

Damaged weights files (random bytes, empty, truncated, other tensors, wrong shapes, other objects) are
named with how to get a good copy; wrong A/B paths are named before the weights are looked for."""

import subprocess
import sys

import pytest
import torch
import yaml
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from gensuite.evaluation import inception
from launchers import ROOT

FIX = (f"replace it with torch-fidelity's {inception.WEIGHTS_FILE} ({URL_INCEPTION_V3}), or point "
       f"eval.inception_weights or ${inception.WEIGHTS_ENV} at a good copy")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return inception.write_random_weights(tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE, seed=0)


def gensuite(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gensuite", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_one_error_line(result, line):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [line]


class Unsafe:  # a pickled object: weights_only loading refuses it
    pass


def legacy_copy(weights, path):
    """The weights in PyTorch's pre-1.6 file format without BatchNorm counters, as torch-fidelity's
    2020 release file is written."""
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def bad_files(weights, folder):
    """(file, why) for each way a weights file can be wrong."""
    good = torch.load(weights, weights_only=True)
    raw = weights.read_bytes()
    legacy = legacy_copy(weights, folder / "legacy.pth").read_bytes()
    cases = {
        "random.pth": (lambda p: p.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                             generator=torch.Generator().manual_seed(0))
                                               .numpy().tobytes()), "not a PyTorch file"),
        "empty.pth": (lambda p: p.write_bytes(b""), "an empty file"),
        "truncated.pth": (lambda p: p.write_bytes(raw[:len(raw) // 2]), "a truncated PyTorch file"),
        "other.pth": (lambda p: torch.save({"conv.weight": torch.zeros(3), "conv.bias": torch.zeros(3)}, p),
                      "none of InceptionV3's 472 tensors; it holds 'conv.weight', 'conv.bias'"),
        "partial.pth": (lambda p: torch.save({k: v for k, v in good.items() if k != "fc.bias"}, p),
                        "1 of InceptionV3's 472 tensors missing, e.g. 'fc.bias'"),
        "extra.pth": (lambda p: torch.save({**good, "head.weight": torch.zeros(2)}, p),
                      "'head.weight', which InceptionV3 does not have"),
        "shape.pth": (lambda p: torch.save({**good, "fc.weight": torch.zeros(10, 2048)}, p),
                      "'fc.weight' has shape (10, 2048), InceptionV3's is (1008, 2048)"),
        "legacy-truncated.pth": (lambda p: p.write_bytes(legacy[:len(legacy) // 2]), "a truncated or damaged PyTorch file"),
        "checkpoint.pth": (lambda p: torch.save({"step": 3, "config": {}, "networks": {}}, p),
                           "none of InceptionV3's 472 tensors; it holds 'step', 'config', 'networks'"),
        "number.pth": (lambda p: torch.save({**good, "fc.bias": 3}, p), "'fc.bias' is not a tensor (int)"),
        "list.pth": (lambda p: torch.save([torch.zeros(1)], p), "it holds a list, not a dict of tensors"),
        "object.pth": (lambda p: torch.save({"fc.weight": Unsafe()}, p), "it holds Python objects besides tensors"),
    }
    out = []
    for name, (write, why) in cases.items():
        write(folder / name)
        out.append((folder / name, why))
    return out


def test_damaged_weights_files_are_named_in_process(weights, tmp_path):
    for path, why in bad_files(weights, tmp_path):
        with pytest.raises(inception.GensuiteError) as caught:
            inception.weights_path(str(path))
        assert str(caught.value) == f"{path}: not torch-fidelity InceptionV3 weights ({why}); {FIX}", path.name
        with pytest.raises(inception.GensuiteError):
            inception.extractor(path, torch.device("cpu"))
    # good files pass: the file written here, and the same tensors in the old format
    for good in (weights, tmp_path / "legacy.pth"):
        assert inception.weights_path(str(good)) == good
        net = inception.extractor(good, torch.device("cpu"))
        assert torch.equal(net.state_dict()["fc.weight"], torch.load(weights, weights_only=True)["fc.weight"])


@pytest.mark.parametrize("name", ["random.pth", "truncated.pth", "other.pth", "shape.pth", "object.pth"])
def test_fid_names_a_damaged_weights_file(weights, shard_root, tmp_path, name):
    path, why = next((p, w) for p, w in bad_files(weights, tmp_path) if p.name == name)
    digits = shard_root / "digits"
    result = gensuite("fid", digits, digits, "--weights", path)
    assert_one_error_line(result, f"error: {path}: not torch-fidelity InceptionV3 weights ({why}); {FIX}")


def test_fid_names_a_missing_or_unusable_source_before_the_weights(shard_root, tmp_path):
    digits = shard_root / "digits"
    missing_weights = tmp_path / "no-weights.pth"
    assert_one_error_line(gensuite("fid", tmp_path / "nowhere", digits, "--weights", missing_weights),
                          f"error: {tmp_path / 'nowhere'}: no such folder, shard set or run directory")
    assert_one_error_line(gensuite("fid", digits, tmp_path / "nowhere", "--weights", missing_weights),
                          f"error: {tmp_path / 'nowhere'}: no such folder, shard set or run directory")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(gensuite("fid", tmp_path / "empty", digits, "--weights", missing_weights),
                          f"error: {tmp_path / 'empty'}: no images (.bmp, .jpeg, .jpg, .png, .webp) in this folder")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert_one_error_line(gensuite("fid", tmp_path / "run", digits, "--weights", missing_weights),
                          f"error: {tmp_path / 'run'}: no checkpoints in this run directory "
                          "(expected checkpoints/step-*.pt)")
    assert_one_error_line(gensuite("fid", digits, digits, "--split", "dev", "--weights", missing_weights),
                          f"error: {digits / 'manifest.json'}: no split 'dev'; it has train, test")
    # both usable: now the weights are looked for
    result = gensuite("fid", digits, digits, "--weights", missing_weights)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert f"Inception weights not found at {missing_weights}" in result.stderr


def test_training_refuses_damaged_weights_before_it_starts(weights, shard_root, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(weights.read_bytes()[:1000])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "gan", "family": "gan", "flavor": "debug",
        "data": {"dataset": "digits", "root": str(shard_root)},
        "train": {"steps": 2, "batch_size": 16},
        "eval": {"metrics": ["inception"], "inception_weights": str(bad)},
        "log": {"progress_bar": False}}))
    result = gensuite("train", job, "--run-dir", tmp_path / "run")
    assert_one_error_line(result, f"error: eval.metrics[0]: inception needs usable Inception weights: {bad}: not "
                                  f"torch-fidelity InceptionV3 weights (a truncated PyTorch file); {FIX}")
    assert not (tmp_path / "run" / "checkpoints").exists()
