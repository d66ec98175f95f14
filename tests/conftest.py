import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    """Small real shard sets built once per session: digits at 16x16, two-moons, and captioned
    shapes at 38 px (cropped to 32, then resized to the debug StackGAN's 16 px) with 16-d text."""
    from gensuite.data.shards import build

    root = tmp_path_factory.mktemp("shards")
    build("digits", None, str(root), size=16, progress=False)
    build("moons", None, str(root), n=2000, progress=False)
    build("shapes", None, str(root), n=96, n_test=24, size=38, text_dim=16, progress=False)
    return root


@pytest.fixture(scope="session")
def png_shard_root(tmp_path_factory) -> Path:
    """The digits set of ``shard_root`` built with the PNG encoding (one PNG member per sample; the
    default for 16 px is raw records), for tests that damage or read PNG members."""
    from gensuite.data.shards import build

    root = tmp_path_factory.mktemp("png_shards")
    build("digits", None, str(root), size=16, encoding="png", progress=False)
    return root


@pytest.fixture(scope="session")
def validation_root(tmp_path_factory) -> Path:
    """Digits at 16x16 with 10% of the training samples held out: 1,350 train / 150 validation / 297 test."""
    from gensuite.data.shards import build

    root = tmp_path_factory.mktemp("shards_validation")
    build("digits", None, str(root), size=16, validation=0.1, progress=False)
    return root
