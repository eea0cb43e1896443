"""SIG (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without
label poisoning", ICIP 2019): a clean-label attack whose trigger is a horizontal sinusoidal
signal added to the whole image.

    v(i, j) = Δ·sin(2π·j·f / m)        (j the column, m the image width, f = 6)
    x' = clip(x + v, 0, 1)

* Training: only target-class images are poisoned (8% of the training set, NBA Table 1), with
  Δ = ``delta_train`` = 20/255; labels are never changed.
* Test: every image gets the same signal with Δ = ``delta_test``.

What the paper leaves open, and what this implementation chose: Δ is given in [0, 1] pixel units
(the paper's Δ = 20 on 0-255 images is 20/255). Re-implementations often amplify the signal at
test time, commonly Δ_test = 40/255, which raises ASR; the default here keeps the training
strength, 20/255, so ``delta_test`` defaults to it. The signal is the same on every row
and every channel. ``state["signal"]`` holds the unit-amplitude 1×1×1×W row.

``mode: mix`` is the SIG of NAD's reference code (Li et al., "Neural Attention Distillation",
ICLR 2021; bboylyg/NAD data_loader.py, ``_signalTrigger``), which NBA's setting descends from: a
stored vertical-stripe mask blended into the image at α = 0.2, the same at training and test,

    x' = (1 − α)·x + α·s,   s(i, j) = (1 + sin(2π·j·f / m)) / 2

The mask itself ships only as a binary file; ``s``, the same sinusoid stretched to [0, 1], is our
choice for it. It moves a pixel by up to α/2 = 0.1 and lowers the contrast by 1 − α: a stronger
cue than Δ = 20/255 added (docs/measurements.md, "The methods as their authors ran them").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from trainables.attacks.base import Attack, CleanLabelParams
from trainables.data.base import Dataset
from trainables.params import param
from trainables.registry import register_attack


@dataclass(frozen=True)
class Params(CleanLabelParams):
    delta_train: float = param(20 / 255, "signal amplitude Δ on poisoned training images, [0,1] units "
                                         "(Barni et al.: 20/255)", low=0.0, high=1.0)
    delta_test: float = param(20 / 255, "signal amplitude Δ on test images (20/255 = the training "
                                        "strength; 40/255 is common)", low=0.0, high=1.0)
    frequency: float = param(6.0, "number f of sine periods across the image width (Barni et al.: 6)", low=0.0)
    mode: str = param("add", "add: x + Δ·v (Barni et al.) | mix: (1−α)·x + α·(1 + v)/2, a blend like NAD's "
                             "reference code (the same at training and test; Δ unused)", choices=("add", "mix"))
    alpha: float = param(0.2, "blend weight α of mode mix (NAD's data_loader.py: 0.2)", low=0.0, high=1.0)


def sine_signal(width: int, frequency: float) -> torch.Tensor:
    """The unit-amplitude signal ``sin(2π·j·f/m)`` over the columns j = 0..m−1, shaped 1×1×1×m."""
    j = torch.arange(width, dtype=torch.float64)
    return torch.sin(2 * math.pi * j * frequency / width).float().view(1, 1, 1, width)


def add_signal(x: torch.Tensor, signal: torch.Tensor, delta: float) -> torch.Tensor:
    """``clip(x + Δ·v)`` on a float [0, 1] batch."""
    return (x + delta * signal.to(x.device, x.dtype)).clamp(0, 1)


def mix_signal(x: torch.Tensor, signal: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·x + α·(1 + v)/2`` on a float [0, 1] batch."""
    return (1 - alpha) * x + alpha * (1 + signal.to(x.device, x.dtype)) / 2


@register_attack
class SIG(Attack):
    name: ClassVar[str] = "sig"
    kind: ClassVar[str] = "clean-label"
    Params: ClassVar[type] = Params
    summary: ClassVar[str] = "clean-label: a horizontal sine signal (Δ = 20/255, f = 6) on target-class images"
    paper: ClassVar[str] = "Barni, Kallas & Tondi, ICIP 2019"

    def __init__(self, params: Params, dataset: Dataset):
        super().__init__(params, dataset)
        self.state = {"signal": sine_signal(self.image_size, params.frequency)}

    def _stamp(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        if self.params.mode == "mix":
            return mix_signal(x, self.state["signal"], self.params.alpha)
        return add_signal(x, self.state["signal"], delta)

    def poison(self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._stamp(x, self.params.delta_train)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._stamp(x, self.params.delta_test)
