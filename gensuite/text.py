"""Text encoders that turn captions into the fixed-size embeddings text-to-image families condition on.

The manifest of a captioned shard set records the encoder (``{"name": ..., "dim": ..., "model": ...}``) so
that sampling from new text embeds it the same way the training captions were embedded:

- ``hashing``: built in, deterministic everywhere, no model files; good enough for the ``shapes`` demo;
- ``sentence``: a sentence-transformers model from a local directory (optional extra, never downloaded);
- ``char_cnn_rnn``: the precomputed embeddings shipped with StackGAN's CUB data; there is no encoder
  for new text.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from gensuite.errors import GensuiteError

TEXT_ENCODERS = ("hashing", "sentence", "char_cnn_rnn")
SENTENCE_HINT = ("install the optional extra `pip install gensuite[text]` (sentence-transformers) and point "
                 "--text-model at a downloaded model directory such as all-MiniLM-L6-v2")


class TextEncoder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32."""

    def describe(self) -> dict:
        """The manifest's ``text_encoder`` entry; ``encoder_for`` turns it back into this encoder."""


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@lru_cache(maxsize=1 << 16)
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, which would change every embedding.
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little") % dim, (1.0 if digest[4] & 1 else -1.0)


class HashingEncoder:
    """Signed feature hashing of word unigrams and bigrams, L2-normalised.

    Bigrams carry word order: "red circle on a blue background" and "blue circle on a red background"
    share every word but few bigrams, so their embeddings differ."""

    name = "hashing"

    def __init__(self, dim: int = 256):
        if int(dim) < 2:
            raise GensuiteError(f"--text-dim: must be at least 2, got {dim!r}")
        self.dim = int(dim)

    def features(self, text: str) -> list[str]:
        tokens = words(text)
        return [f"w:{t}" for t in tokens] + [f"b:{a} {b}" for a, b in zip(tokens, tokens[1:])]

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for feature in self.features(text):
                index, sign = _bucket(feature, self.dim)
                out[row, index] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)  # empty text stays all zeros

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim}


class SentenceEncoder:
    """A sentence-transformers model loaded offline from a local directory (or the local cache)."""

    name = "sentence"

    def __init__(self, model: str | None):
        if not model:
            raise GensuiteError(f"--text-model: required with --text-encoder sentence; {SENTENCE_HINT}")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise GensuiteError(f"--text-model: sentence-transformers is not installed; {SENTENCE_HINT}") from None
        # Never download at build or sampling time: a missing model must fail, not fetch.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        local = Path(model).expanduser()
        self.model_name = str(local.resolve()) if local.is_dir() else str(model)
        try:
            self.model = SentenceTransformer(self.model_name, device="cpu", local_files_only=True)
        except Exception as e:  # the library raises OSError, ValueError, HF errors... for a missing model
            reason = " ".join(str(e).split())[:200]
            raise GensuiteError(f"--text-model: cannot load {model!r} offline ({type(e).__name__}: {reason}); "
                                f"{SENTENCE_HINT}") from None
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(list(texts), batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                                    show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "model": self.model_name}


def make_encoder(name: str, model: str | None = None, dim: int = 256) -> TextEncoder:
    """The encoder chosen by the build options ``--text-encoder``, ``--text-model``, ``--text-dim``."""
    if name == "hashing":
        return HashingEncoder(dim)
    if name == "sentence":
        return SentenceEncoder(model)
    if name == "char_cnn_rnn":
        raise GensuiteError(char_cnn_rnn_message())
    raise GensuiteError(f"--text-encoder: unknown encoder {name!r}; choose hashing or sentence")


def char_cnn_rnn_message() -> str:
    return ("text_encoder char_cnn_rnn: these are the precomputed char-CNN-RNN embeddings of StackGAN's authors; "
            "gensuite cannot embed new text with them; rebuild the shards with `--text-encoder sentence "
            "--text-model DIR` or `--text-encoder hashing` to sample from new text")


def encoder_for(text_encoder: Mapping) -> TextEncoder:
    """The encoder a shard set's captions were embedded with (its manifest's ``text_encoder``)."""
    name = text_encoder.get("name") if text_encoder else None
    if not name:
        raise GensuiteError("text_encoder: this shard set has no text embeddings; build a captioned dataset "
                            "(cub or shapes) to condition on text")
    if name == "hashing":
        return HashingEncoder(int(text_encoder.get("dim", 256)))
    if name == "sentence":
        encoder = SentenceEncoder(text_encoder.get("model"))
        if text_encoder.get("dim") not in (None, encoder.dim):
            raise GensuiteError(f"--text-model: {encoder.model_name} gives {encoder.dim}-d embeddings but the shards "
                                f"were embedded in {text_encoder['dim']}-d; use the model the shards were built with")
        return encoder
    return make_encoder(name)
