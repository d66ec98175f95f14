"""Image classifiers: a baseline of their own (the seeds' loss/accuracy curves and confusion
matrices) and, trained once per dataset, the judge of generated samples (classifier FID,
conditional accuracy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from gensuite.errors import ConfigError, GensuiteError
from gensuite.families.classifier.networks import Classifier
from gensuite.registry import Batch, GenerativeFamily, Networks, register


@dataclass
class ClassifierConfig:
    architecture: Literal["mlp", "conv"] = "conv"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # mlp widths
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # conv stages, each halves the size
    dropout: float = 0.25
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout", "must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("model.label_smoothing", "must be in [0, 1)")
        if any(w < 1 for w in [*self.hidden, *self.channels]):
            raise ConfigError("model.hidden", "layer widths must be >= 1")


@register
class ImageClassifier(GenerativeFamily):
    name = "classifier"
    config_class = ClassifierConfig
    flavors = {
        "mlp": {"architecture": "mlp", "hidden": [256, 128]},
        "conv": {"architecture": "conv", "channels": [32, 64, 128]},
        "debug": {"architecture": "mlp", "hidden": [32], "dropout": 0.0},
    }

    def __init__(self, cfg: ClassifierConfig, data):
        super().__init__(cfg, data)
        if data.num_classes < 2:
            raise ConfigError("data.dataset", f"{data.dataset} has no class labels to learn")
        if cfg.architecture == "conv" and (data.kind != "image" or data.image_size < 2 ** len(cfg.channels)):
            raise ConfigError("model.architecture", f"conv needs images of at least {2 ** len(cfg.channels)} "
                                                    f"pixels; use mlp for {data.dataset}")

    def build_networks(self):
        c = self.cfg
        return {"classifier": Classifier(self.data.shape, self.data.num_classes, c.architecture, c.hidden,
                                         c.channels, c.dropout)}

    def loss(self, player: str, nets: Networks, batch: Batch, step: int):
        logits = nets["classifier"](batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(1) == batch["y"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def predict(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        """Class logits (EMA weights when kept)."""
        return nets.ema("classifier")(x)

    def features(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, the space of the classifier FID."""
        return nets.ema("classifier").features(x)

    def fixed_inputs(self, n: int, generator: torch.Generator):
        return {}

    def sample(self, nets: Networks, fixed):
        raise GensuiteError("a classifier run does not generate samples; sample from a generative run")

    def visuals(self, nets: Networks, fixed, reference: Batch):
        """Held-out images with predicted (and true) labels; misclassified titles in red."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.data.kind != "image":  # points: colour each by its predicted class
            predicted = self.predict(nets, reference["x"]).argmax(1).cpu()
            fig, ax = plt.subplots(figsize=(4, 4))
            xy = reference["x"].cpu().numpy()
            ax.scatter(xy[:, 0], xy[:, 1], c=predicted.numpy(), cmap="tab10", s=6, vmin=0, vmax=9)
            fig.tight_layout()
            return {"predictions": fig}
        x, y = reference["x"][:16], reference["y"][:16]
        predicted = self.predict(nets, x).argmax(1)
        names = self.data.class_names
        fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
        for ax, image, p, t in zip(axes.flat, x.cpu(), predicted.tolist(), y.tolist()):
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
            ax.set_title(f"{names[p]}" + ("" if p == t else f" ({names[t]})"), color="black" if p == t else "red",
                         fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        return {"predictions": fig}
