"""BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying vulnerabilities in the machine learning
model supply chain", arXiv:1708.06733, 2017): a small fixed patch pasted over the pixels of a
training image whose label is changed to the target.

    x' = (1 − m)·x + m·p                                     (paste: m the patch mask, p its pattern)

* Trigger: a ``patch_size``×``patch_size`` patch in the bottom-right corner (rows/cols 29–31 of a
  32×32 image; the last ``patch_size`` rows/cols for any image size), the same value on every
  channel. ``pattern="grid"`` is NAD's / NBA's grid ``[[0,0,1],[0,1,0],[1,0,1]]`` (the default:
  NBA follows NAD's settings); ``"white"`` is a plain white square.
* Poisoning: 10% of the training set (NBA Table 1), drawn among non-target images, relabelled to
  the target. Test images get the same patch.

What the paper leaves open, and what this implementation chose:

* A grid patch larger or smaller than 3×3 tiles the 3×3 grid, anchored at the corner pixel, so
  its bottom-right 3×3 is always the reference grid.
* The trigger is deterministic; ``state`` still holds its pattern and mask (1×H×W) so an
  artifact describes its own trigger. ``paste`` and ``corner_mask`` are shared with the other
  corner-patch attacks (TrojanNN, CLA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from trainables.attacks.base import Attack, AttackParams
from trainables.data.base import Dataset
from trainables.params import param
from trainables.registry import register_attack

GRID = ((0.0, 0.0, 1.0),
        (0.0, 1.0, 0.0),
        (1.0, 0.0, 1.0))
PATTERNS = ("grid", "white")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class Params(AttackParams):
    poison_rate: float = param(0.1, "poisoned fraction of the training set (NBA Table 1: 0.1)", low=0.0, high=1.0)
    pattern: str = param("grid", "patch content: grid = [[0,0,1],[0,1,0],[1,0,1]] on every channel "
                                 "(NAD/NBA) | white", choices=PATTERNS)
    patch_size: int = param(3, "side of the square patch in pixels (Gu et al. / NAD: 3)", low=1, high=32)


# ============================================================================ shared patch helpers

def corner_mask(image_size: int, patch_size: int, corner: str = "bottom-right", margin: int = 0) -> torch.Tensor:
    """1×H×W mask that is 1 on the ``patch_size``×``patch_size`` square in ``corner``
    (``top-left``, ``top-right``, ``bottom-left``, ``bottom-right``), ``margin`` pixels in from
    both of that corner's edges."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; known: {', '.join(CORNERS)}")
    if not 1 <= patch_size <= image_size - margin or margin < 0:
        raise ValueError(f"patch_size={patch_size} with margin={margin} does not fit a {image_size}×{image_size} image")
    mask = torch.zeros(1, image_size, image_size)
    near, far = slice(margin, margin + patch_size), slice(image_size - margin - patch_size, image_size - margin)
    rows = near if corner.startswith("top") else far
    cols = near if corner.endswith("left") else far
    mask[:, rows, cols] = 1.0
    return mask


def paste(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 − m)·x + m·p`` on a float [0, 1] batch; ``pattern`` 3×H×W, ``mask`` 1×H×W (may be
    fractional for a reduced-amplitude trigger)."""
    pattern = pattern.to(x.device, x.dtype)
    mask = mask.to(x.device, x.dtype)
    return ((1 - mask) * x + mask * pattern).clamp(0, 1)


def grid_patch(patch_size: int) -> torch.Tensor:
    """s×s tiling of ``GRID`` anchored so that the corner pixel is the grid's bottom-right one."""
    grid = torch.tensor(GRID)
    i = (torch.arange(patch_size) - patch_size) % 3        # last row/col -> grid row/col 2
    return grid[i][:, i]


def badnets_trigger(image_size: int, patch_size: int, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern 3×H×W, mask 1×H×W) of the bottom-right patch."""
    mask = corner_mask(image_size, patch_size)
    patch = grid_patch(patch_size) if pattern == "grid" else torch.ones(patch_size, patch_size)
    full = torch.zeros(3, image_size, image_size)
    full[:, image_size - patch_size:, image_size - patch_size:] = patch   # same value on every channel
    return full, mask


# ============================================================================ the attack

@register_attack
class BadNets(Attack):
    name: ClassVar[str] = "badnets"
    kind: ClassVar[str] = "poison-label"
    Params: ClassVar[type] = Params
    summary: ClassVar[str] = "3×3 grid (or white) patch in the bottom-right corner, poisoned images relabelled"
    paper: ClassVar[str] = "Gu et al., BadNets, arXiv:1708.06733 (2017)"

    def __init__(self, params: Params, dataset: Dataset):
        super().__init__(params, dataset)
        pattern, mask = badnets_trigger(self.image_size, params.patch_size, params.pattern)
        self.state = {"pattern": pattern, "mask": mask}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return paste(x, self.state["pattern"], self.state["mask"])
