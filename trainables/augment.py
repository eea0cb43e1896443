"""Batched on-device augmentation for semi-supervised training (FixMatch's weak and strong views).

* ``weak(x, gen)``: random crop with 4-pixel padding + horizontal flip, the engine's own
  ``random_crop_flip`` (FixMatch's weak view).
* ``strong(x, gen)``: FixMatch's strong view: the weak flip + crop, then RandAugment with 2 ops
  drawn uniformly from FixMatch's 14-op list, each with a magnitude drawn uniformly from its range
  for every sample (the "random magnitude" variant of the FixMatch paper, Sohn et al. 2020,
  Table 12) and applied with probability 0.5 (as in the widely used PyTorch port,
  kekmodel/FixMatch-pytorch ``RandAugmentMC``), then Cutout of a 16×16 grey (0.5) square whose
  centre is uniform over the image (clipped at the border).

Everything works on a whole float ``[0, 1]`` NCHW batch on its device: each op draws its own
per-sample choices from the given generator, samples are grouped by the op they drew (one batched
call per op; the five geometric ops share one ``grid_sample`` with a per-sample affine matrix), and
every op clips to ``[0, 1]``. No PIL, no per-image Python loop.

The ops and their magnitude ranges (FixMatch Table 12; enhance factors as PIL's ``ImageEnhance``):

=============  =========================  =================================================
op             magnitude                  what it does here
=============  =========================  =================================================
AutoContrast   —                          per-channel min/max stretch (torchvision)
Brightness     factor in [0.05, 0.95]     blend with black
Color          factor in [0.05, 0.95]     blend with the grey (ITU-R 601 luma) image
Contrast       factor in [0.05, 0.95]     blend with the image's mean grey level
Equalize       —                          per-channel histogram equalisation (torchvision)
Identity       —                          nothing
Posterize      bits in {4, …, 8}          keep the top ``bits`` bits of each 8-bit value
Rotate         angle in [-30°, 30°]       about the centre
Sharpness      factor in [0.05, 0.95]     blend with PIL's SMOOTH-filtered image
ShearX/Y       shear in [-0.3, 0.3]       about the centre
Solarize       threshold in [0, 1]        invert the pixels at or above the threshold
TranslateX/Y   shift in [-0.3, 0.3]·32px  —
=============  =========================  =================================================

Geometric ops use nearest-neighbour sampling (PIL's default, which the reference
implementations use) and fill the uncovered area with grey 0.5 (their fill 128); shears are about
the image centre rather than PIL's top-left corner (a translation apart).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from trainables.data.loader import random_crop_flip, to_float

OPS = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
       "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
ENHANCE_RANGE = (0.05, 0.95)
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3          # fraction of the image size
FILL = 0.5                   # grey fill of geometric ops and Cutout (PIL fill 128 / 127)
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- the two views

def weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """FixMatch's weak view: 4-pixel-padded random crop + horizontal flip (float [0, 1] out)."""
    x = random_crop_flip(x, gen)
    return to_float(x) if x.dtype == torch.uint8 else x


def strong(x: torch.Tensor, gen: torch.Generator, *, n_ops: int = 2, op_prob: float = 0.5,
           cutout: int = 16) -> torch.Tensor:
    """FixMatch's strong view: weak flip + crop, RandAugment (``n_ops`` ops, random magnitude,
    each applied with ``op_prob``), then a ``cutout``×``cutout`` grey square."""
    x = weak(x, gen)
    n = x.shape[0]
    for _ in range(n_ops):
        op = torch.randint(0, len(OPS), (n,), device=x.device, generator=gen)
        mag = torch.rand(n, device=x.device, generator=gen)          # in [0, 1], mapped per op
        on = torch.rand(n, device=x.device, generator=gen) < op_prob
        x = apply_ops(x, torch.where(on, op, OPS.index("identity")), mag)
    return cutout_(x, cutout, gen) if cutout > 0 else x


def apply_ops(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Apply op ``OPS[op[i]]`` at magnitude ``mag[i]`` ∈ [0, 1] to sample i (batched per op).

    ``mag`` is mapped onto the op's range (signed ops: 0 → −max, 1 → +max)."""
    out = x.clone()
    geo = torch.zeros_like(op, dtype=torch.bool)
    for o in GEOMETRIC:
        geo |= op == OPS.index(o)
    idx = geo.nonzero(as_tuple=True)[0]
    if len(idx):
        out[idx] = _affine(x[idx], op[idx], mag[idx])
    for k, name in enumerate(OPS):
        if name in GEOMETRIC or name == "identity":
            continue
        idx = (op == k).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = _COLOR_OPS[name](x[idx], mag[idx]).clamp_(0, 1)
    return out


# ----------------------------------------------------------------------------- colour ops

def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1).to(dtype=torch.float32)


def _factor(mag: torch.Tensor) -> torch.Tensor:
    lo, hi = ENHANCE_RANGE
    return _col(lo + (hi - lo) * mag)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = _LUMA
    return (r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3])


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor·(x − degenerate)``."""
    return degenerate + factor * (x - degenerate)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3×3, centre 5, others 1, /13); border pixels unchanged, as in PIL."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return out


def _posterize(x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    bits = 4 + torch.floor(mag * 5).clamp_(max=4)                   # {4, ..., 8}
    step = _col(torch.pow(2.0, 8 - bits))
    return torch.floor(torch.round(x * 255) / step) * step / 255


_COLOR_OPS = {
    "autocontrast": lambda x, m: TF.autocontrast(x),
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), _factor(m)),
    "color": lambda x, m: _blend(x, _grey(x).expand_as(x), _factor(m)),
    "contrast": lambda x, m: _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), _factor(m)),
    "equalize": lambda x, m: TF.equalize(x),
    "posterize": _posterize,
    "sharpness": lambda x, m: _blend(x, _smooth(x), _factor(m)),
    "solarize": lambda x, m: torch.where(x >= _col(m), 1.0 - x, x),
}


# ----------------------------------------------------------------------------- geometric ops

def _affine(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate, one per-sample 2×3 matrix (output → input coordinates in
    ``affine_grid``'s normalised [-1, 1] frame, centred), one ``grid_sample``."""
    n = x.shape[0]
    signed = 2 * mag.float() - 1                                   # [-1, 1]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    angle = signed * math.radians(MAX_ROTATE_DEG)
    is_rot = op == OPS.index("rotate")
    theta[:, 0, 0] = torch.where(is_rot, torch.cos(angle), theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(is_rot, -torch.sin(angle), theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(is_rot, torch.sin(angle), theta[:, 1, 0])
    theta[:, 1, 1] = torch.where(is_rot, torch.cos(angle), theta[:, 1, 1])
    theta[:, 0, 1] = torch.where(op == OPS.index("shear_x"), signed * MAX_SHEAR, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(op == OPS.index("shear_y"), signed * MAX_SHEAR, theta[:, 1, 0])
    shift = signed * MAX_TRANSLATE * 2                             # normalised units: 2 = full width
    theta[:, 0, 2] = torch.where(op == OPS.index("translate_x"), shift, theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(op == OPS.index("translate_y"), shift, theta[:, 1, 2])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample (x − fill) with zero padding and add the fill back: uncovered pixels become FILL
    out = F.grid_sample(x.float() - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (out + FILL).to(x.dtype)


# ----------------------------------------------------------------------------- Cutout

def cutout_(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Grey ``size``×``size`` square at a uniform centre per sample, clipped at the border
    (FixMatch's CutoutAbs); in place, returns ``x``."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n,), device=x.device, generator=gen)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    y0, x0 = (cy - size // 2)[:, None], (cx - size // 2)[:, None]
    in_rows = (rows[None] >= y0) & (rows[None] < y0 + size)                 # n×h
    in_cols = (cols[None] >= x0) & (cols[None] < x0 + size)                 # n×w
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]               # n×1×h×w
    return x.masked_fill_(box, FILL)
