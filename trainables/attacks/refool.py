"""Refool (Liu, Ma, Bailey & Lu, "Reflection backdoor: a natural backdoor attack on deep neural
networks", ECCV 2020): a clean-label attack whose trigger is a reflection, blended into
target-class training images the way reflections form on glass.

Physical model, in linear light (pixels raised to γ = 2.2 before mixing, back after):

    x' = (α_t·x^γ + (1 − α_t)·R(r)^γ)^(1/γ),    α_t = 1 − U(0.05, 0.45)

with r a reflection image drawn from a pool and R one of the paper's two reflection types:

* ghost (probability 0.5): ``R(r) = a·r + (1 − a)·shift(r, (dy, dx))``, a shifted, attenuated
  double image, offsets dy, dx ~ U{3..8} px, a = |s − U(0.15, 0.5)| with s ∈ {0, 1} a fair coin
  (the official code's attenuation);
* otherwise out-of-focus: ``R(r) = G_σ ∗ r``, a Gaussian blur with σ ~ U(1, 5).

* Training: only target-class images get reflections (8% of the training set, NBA Table 1);
  labels are never changed. Test: every image gets a random reflection from the same pool.
* Randomness (which reflection, α_t, type, offsets, σ) comes from the ``generator`` argument.

What the paper leaves open, and what this implementation chose:

* Pool: ``reflection_dir`` = any image folder (files found recursively, read as RGB, resized to
  the image size; at most ``pool_size`` of them, drawn with ``poison_seed``). Without one, a
  generated pool of ``pool_size`` smooth images (colour gradients, low-frequency colour fields and
  soft ellipses) from ``poison_seed`` stands in for the paper's natural images (PascalVOC). The
  paper's adversarial selection of the most effective reflections (retraining rounds on a
  candidate set) is not run: every pool image is used.
* One mixing rule for both types, the convex blend with α_t above. The official code's blur branch
  instead adds the blurred reflection with a brightness correction and a vignette, and its ghost
  branch crops the overlap and resizes it back; here the shifted copy repeats the edge pixels.
* The pool is kept in ``state["pool"]`` (uint8 P×3×H×W) so a defense trial draws from exactly the
  same reflections. Everything is vectorised over the batch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from trainables.attacks.base import Attack, CleanLabelParams
from trainables.data._images import IMG_EXTENSIONS, decode_files
from trainables.data.base import DataError, Dataset
from trainables.data.loader import to_float, to_uint8
from trainables.params import param
from trainables.registry import register_attack


@dataclass(frozen=True)
class Params(CleanLabelParams):
    reflection_dir: str | None = param(None, "folder of reflection images (any image files, resized); "
                                             "None = a generated pool (paper: PascalVOC images)")
    pool_size: int = param(200, "reflection images in the pool (generated, or drawn from the folder; "
                                "paper: a set selected from PascalVOC candidates)", low=1)
    ghost_rate: float = param(0.5, "probability of a ghost reflection, else a blurred one (paper: 0.5)",
                              low=0.0, high=1.0)
    reflect_min: float = param(0.05, "reflection weight 1 − α_t ~ U(reflect_min, reflect_max) (paper: 0.05)",
                               low=0.0, high=1.0)
    reflect_max: float = param(0.45, "upper end of the reflection weight 1 − α_t (paper: 0.45)", low=0.0, high=1.0)
    gamma: float = param(2.2, "gamma of the linear-light blend (paper: 2.2)", low=0.1, high=5.0)
    offset_min: int = param(3, "smallest ghost shift in pixels (paper: 3)", low=0)
    offset_max: int = param(8, "largest ghost shift in pixels (paper: 8)", low=0)
    sigma_min: float = param(1.0, "smallest blur σ in pixels (paper: 1)", low=0.0)
    sigma_max: float = param(5.0, "largest blur σ in pixels (paper: 5)", low=0.0)

    def __post_init__(self):
        for lo, hi in (("reflect_min", "reflect_max"), ("offset_min", "offset_max"), ("sigma_min", "sigma_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo}={getattr(self, lo)} is above {hi}={getattr(self, hi)}")


# ============================================================================ the reflection pool

def folder_pool(path: str, size: int, limit: int, seed: int) -> torch.Tensor:
    """Up to ``limit`` images of a folder (recursive, sorted, a seeded draw when there are more)
    as uint8 N×3×size×size."""
    if not os.path.isdir(path):
        raise DataError(f"refool: reflection_dir {path} is not a folder")
    files = sorted(os.path.join(root, f) for root, dirs, names in os.walk(path) for f in names
                   if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise DataError(f"refool: no image files ({', '.join(IMG_EXTENSIONS)}) in reflection_dir {path}")
    if len(files) > limit:
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        files = [files[i] for i in keep.sort().values.tolist()]
    return decode_files(files, size)


def generated_pool(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth synthetic "scenes" as uint8 n×3×size×size: a two-colour linear gradient, a
    low-frequency colour field and three soft ellipses each."""
    g = torch.Generator().manual_seed(seed)
    U = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")                                      # size×size in (0, 1)

    angle = U(n, 1, 1) * 2 * math.pi
    ramp = ((xx - 0.5) * torch.cos(angle) + (yy - 0.5) * torch.sin(angle)) * math.sqrt(2) + 0.5
    ramp = ramp.clamp(0, 1).unsqueeze(1)                                              # n×1×s×s
    img = U(n, 3, 1, 1) * (1 - ramp) + U(n, 3, 1, 1) * ramp
    field = F.interpolate(U(n, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=False)
    img = 0.7 * img + 0.3 * field.clamp(0, 1)
    for _ in range(3):
        cy, cx, rot = U(n, 1, 1), U(n, 1, 1), U(n, 1, 1) * math.pi
        ry, rx = 0.08 + 0.3 * U(n, 1, 1), 0.08 + 0.3 * U(n, 1, 1)
        u = ((xx - cx) * torch.cos(rot) + (yy - cy) * torch.sin(rot)) / rx
        v = (-(xx - cx) * torch.sin(rot) + (yy - cy) * torch.cos(rot)) / ry
        inside = torch.sigmoid((1 - torch.sqrt(u * u + v * v)) * 6).unsqueeze(1)     # soft edge
        img = img * (1 - inside) + U(n, 3, 1, 1) * inside
    return to_uint8(img)


# ============================================================================ the reflection model

def shift(r: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image moved down/right by its own (dy, dx) pixels, edge pixels repeated."""
    n, _, h, w = r.shape
    rows = (torch.arange(h, device=r.device)[None] - dy[:, None]).clamp(0, h - 1)    # n×h
    cols = (torch.arange(w, device=r.device)[None] - dx[:, None]).clamp(0, w - 1)    # n×w
    b = torch.arange(n, device=r.device)[:, None, None, None]
    ch = torch.arange(r.shape[1], device=r.device)[None, :, None, None]
    return r[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def gaussian_blur(r: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ (kernel radius ⌈2σ_max⌉, as the official
    code's ``2⌈2σ⌉ + 1`` window), one grouped convolution per direction."""
    n, c, h, w = r.shape
    k = max(1, math.ceil(2 * sigma_max))
    t = torch.arange(-k, k + 1, device=r.device, dtype=r.dtype)
    kern = torch.exp(-t[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))     # n×(2k+1)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)             # (n·c)×(2k+1)
    out = r.reshape(1, n * c, h, w)
    out = F.conv2d(F.pad(out, (k, k, 0, 0), mode="replicate"), kern.view(n * c, 1, 1, -1), groups=n * c)
    out = F.conv2d(F.pad(out, (0, 0, k, k), mode="replicate"), kern.view(n * c, 1, -1, 1), groups=n * c)
    return out.view(n, c, h, w)


def reflect(x: torch.Tensor, r: torch.Tensor, alpha_t: torch.Tensor, ghost: torch.Tensor,
            dy: torch.Tensor, dx: torch.Tensor, attenuation: torch.Tensor, sigma: torch.Tensor,
            gamma: float, sigma_max: float) -> torch.Tensor:
    """``(α_t·x^γ + (1 − α_t)·R(r)^γ)^(1/γ)`` with R the ghost or the blur of each image."""
    t, rl = x.clamp(0, 1).pow(gamma), r.clamp(0, 1).pow(gamma)
    a = attenuation.view(-1, 1, 1, 1)
    ghosted = a * rl + (1 - a) * shift(rl, dy, dx)
    blurred = gaussian_blur(rl, sigma, sigma_max)
    refl = torch.where(ghost.view(-1, 1, 1, 1), ghosted, blurred)
    alpha_t = alpha_t.view(-1, 1, 1, 1)
    return (alpha_t * t + (1 - alpha_t) * refl).clamp(0, 1).pow(1 / gamma)


# ============================================================================ the attack

@register_attack
class Refool(Attack):
    name: ClassVar[str] = "refool"
    kind: ClassVar[str] = "clean-label"
    Params: ClassVar[type] = Params
    summary: ClassVar[str] = ("clean-label: ghost or blurred reflections from a pool blended in linear light "
                              "into target-class images")
    paper: ClassVar[str] = "Liu, Ma, Bailey & Lu, Reflection backdoor, ECCV 2020"

    def __init__(self, params: Params, dataset: Dataset):
        super().__init__(params, dataset)
        if params.reflection_dir:
            pool = folder_pool(params.reflection_dir, self.image_size, params.pool_size, params.poison_seed)
        else:
            pool = generated_pool(params.pool_size, self.image_size, params.poison_seed)
        self.state = {"pool": pool}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random reflection of the pool on every image; all draws from ``generator``."""
        p, n = self.params, len(x)
        dev = generator.device if generator is not None else torch.device("cpu")
        U = lambda: torch.rand(n, generator=generator, device=dev).to(x.device)  # noqa: E731
        pool = self.state["pool"]
        which = torch.randint(len(pool), (n,), generator=generator, device=dev).cpu()
        alpha_t = 1 - (p.reflect_min + (p.reflect_max - p.reflect_min) * U())
        ghost = U() < p.ghost_rate
        dy, dx = (torch.randint(p.offset_min, p.offset_max + 1, (2, n), generator=generator, device=dev)
                  .to(x.device))
        attenuation = (torch.randint(0, 2, (n,), generator=generator, device=dev).to(x.device)
                       - (0.15 + 0.35 * U())).abs()
        sigma = p.sigma_min + (p.sigma_max - p.sigma_min) * U()
        r = to_float(pool[which].to(x.device)).to(x.dtype)
        return reflect(x, r, alpha_t.to(x.dtype), ghost, dy, dx, attenuation.to(x.dtype), sigma.to(x.dtype),
                       p.gamma, max(p.sigma_max, 1e-3))
