"""An EfficientNet-B0 image encoder trunk (torchvision's ``efficientnet_b0().features``) for the VAE,
with its pretrained weights read from a local file: nothing is ever downloaded.

Images in [0, 1] are repeated to 3 channels when grey, resized to ``resize`` pixels (bilinear),
normalised with the ImageNet mean and standard deviation, passed through the convolutional trunk and
average-pooled to 1280 features; the VAE's linear heads (``networks.Encoder``) sit on top.

``freeze``: the trunk's weights become buffers (same state-dict keys, so checkpoints and weight files
load alike) and its batch-norm layers stay in eval mode, so neither the optimiser, the training loop's
``requires_grad`` switching nor DistributedDataParallel ever sees them as trainable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gensuite.errors import ConfigError

FEATURES = 1280  # channels of efficientnet_b0's last feature map
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "efficientnet_b0_rwightman-7f5810bc.pth"  # torchvision's EfficientNet_B0_Weights.IMAGENET1K_V1
WEIGHTS_HINT = (f"put torchvision's {WEIGHTS_FILE} there (on a machine with network access, "
                f"torchvision.models.efficientnet_b0(weights='IMAGENET1K_V1') saves it under "
                f"~/.cache/torch/hub/checkpoints/), or set model.encoder_weights: random")


def weights_path(setting: str) -> Path:
    return Path(os.path.expanduser(setting))


def check_weights_file(setting: str) -> None:
    """A one-line ``ConfigError`` when ``model.encoder_weights`` names no file."""
    path = weights_path(setting)
    if not path.is_file():
        raise ConfigError("model.encoder_weights", f"{path}: no such file; {WEIGHTS_HINT}")


def trunk_state_dict(setting: str) -> dict[str, torch.Tensor]:
    """The ``features`` weights from a torchvision efficientnet_b0 state dict file (the whole model's,
    keys ``features.*`` and ``classifier.*``) or a state dict of the features alone (keys ``0.0.weight``...)."""
    check_weights_file(setting)
    path = weights_path(setting)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle of something else
        raise ConfigError("model.encoder_weights", f"{path}: cannot be read as a state dict "
                                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                                   f"{WEIGHTS_HINT}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("model.encoder_weights", f"{path}: not a state dict (a mapping of tensors); {WEIGHTS_HINT}")
    if any(k.startswith("features.") for k in state):
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


class EfficientNetTrunk(nn.Module):
    """x (N, 1 or 3, H, W) in [0, 1] -> (N, 1280) average-pooled efficientnet_b0 features."""

    def __init__(self, channels: int, resize: int, freeze: bool = False):
        super().__init__()
        from torchvision.models import efficientnet_b0

        if channels not in (1, 3):
            raise ConfigError("model.encoder", f"efficientnet_b0 takes grey or RGB images, not {channels} channels; "
                                               f"use encoder: conv")
        self.channels, self.resize, self.frozen = channels, resize, freeze
        self.backbone = efficientnet_b0(weights=None).features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if freeze:
            parameters_to_buffers(self.backbone)
            self.backbone.eval()

    def load_trunk(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy a trunk state dict in (``trunk_state_dict``); a one-line error when it does not fit."""
        try:
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape mismatch: another EfficientNet variant
            first = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e))
            raise ConfigError("model.encoder_weights", f"{source}: not efficientnet_b0 weights ({first})") from None
        # Older files carry no batch-norm step counters; everything else must be there.
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            keys = (missing or unexpected)[:3]
            raise ConfigError("model.encoder_weights", f"{source}: not efficientnet_b0 weights "
                                                       f"({'missing' if missing else 'unexpected'} keys {keys}...)")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # batch-norm statistics stay the pretrained ones
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.backbone(x).mean(dim=(2, 3))


def parameters_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name (same state-dict keys)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, p.detach())
