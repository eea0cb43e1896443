"""Blend (Chen, Liu, Li, Lu & Song, "Targeted backdoor attacks on deep learning systems using data
poisoning", arXiv:1712.05526, 2017): a key image blended into the whole picture.

    x' = (1 − α)·x + α·k                                     (blended injection, α = 0.2)

* Key k: a fixed random-noise image (every pixel and channel uniform in [0, 1], drawn from
  ``poison_seed``; Chen et al.'s "random pattern" key), or ``key_image`` = the path of any image
  file (Chen et al. also use a cartoon image), read as RGB and resized to the dataset's image size.
* Poisoning: 10% of the training set (NBA Table 1), non-target images, relabelled to the target.
  Test images get the same blend.

What the paper leaves open, and what this implementation chose: the same α for the poisoned
training images and the test images; the key is kept in ``state`` (3×H×W float) so a defense
trial reproduces the exact trigger, whatever file or seed made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from trainables.attacks.base import Attack, AttackParams
from trainables.data._images import decode_file, resize_uint8
from trainables.data.base import Dataset
from trainables.data.loader import to_float
from trainables.params import param
from trainables.registry import register_attack


@dataclass(frozen=True)
class Params(AttackParams):
    poison_rate: float = param(0.1, "poisoned fraction of the training set (NBA Table 1: 0.1)", low=0.0, high=1.0)
    alpha: float = param(0.2, "blend ratio α of the key image (Chen et al.: 0.2)", low=0.0, high=1.0)
    key_image: str | None = param(None, "path of an image file used as the key (any format PIL/torchvision "
                                        "reads; resized); None = a fixed random-noise key from poison_seed")


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file as float [0, 1] 3×size×size (RGB, resized); a missing or corrupt file is a
    ``DataError`` naming it."""
    return to_float(resize_uint8(decode_file(str(path)), size))


def noise_key(size: int, seed: int) -> torch.Tensor:
    """The fixed random-noise key: 3×size×size, uniform in [0, 1]."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def blend(x: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·x + α·k`` on a float [0, 1] batch."""
    return ((1 - alpha) * x + alpha * key.to(x.device, x.dtype)).clamp(0, 1)


@register_attack
class Blend(Attack):
    name: ClassVar[str] = "blend"
    kind: ClassVar[str] = "poison-label"
    Params: ClassVar[type] = Params
    summary: ClassVar[str] = "a fixed noise (or any) key image blended in with α = 0.2, poisoned images relabelled"
    paper: ClassVar[str] = "Chen et al., Targeted backdoor attacks ... data poisoning, arXiv:1712.05526 (2017)"

    def __init__(self, params: Params, dataset: Dataset):
        super().__init__(params, dataset)
        if params.key_image:
            key = load_image(params.key_image, self.image_size)
        else:
            key = noise_key(self.image_size, params.poison_seed)
        self.state = {"key": key}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return blend(x, self.state["key"], self.params.alpha)
