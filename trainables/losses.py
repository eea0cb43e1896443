"""Shared mechanics of the distillation and repair defenses, written once.

Attention maps (NAD, ARGD), Gram matrices (NBA's response behaviour), FSP matrices (NBA's
learning behaviour), temperature KD (NBA's prediction behaviour, CheatKD's logit-KD baseline),
untargeted PGD (NBA's pseudo samples, CLA's perturbations), BatchNorm recalibration (MCR) and
BatchNorm passes that leave the running statistics alone (NBA's pass on pseudo samples).
Feature maps are ``B×C×H×W`` tensors from ``model.features``; every loss averages over the batch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.loader import batches


# ----------------------------------------------------------------------------- attention (NAD)

def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``A(F) = Σ_c |F_c|^p``, flattened and L2-normalised per sample (NAD Eq. 1): B×(H·W)."""
    am = feat.float().abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(am, dim=1)


def attention_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's per-layer term: MSE between the student's and the (detached) teacher's maps."""
    return F.mse_loss(attention_map(feat_s, p), attention_map(feat_t.detach(), p))


# ----------------------------------------------------------------------------- Gram (NBA RNB)

def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Unnormalised per-sample Gram matrix ``G_ij = Σ_k F_ik F_jk`` (k over H·W; NBA Eq. 1): B×C×C."""
    f = feat.float().flatten(2)
    return f @ f.transpose(1, 2)


def gram_style_loss(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """Gatys et al.'s style loss, NBA Eq. 3 with its sum over the C×C entries of the Gram matrices
    (the printed H×W indices are a typo; see ``defenses/nba.py``):
    ``Σ_ij (G^T_ij − G^S_ij)² / (4 C² (HW)²)``, averaged over the batch."""
    b, c, h, w = feat_s.shape
    diff = gram_matrix(feat_t.detach()) - gram_matrix(feat_s)
    return diff.pow(2).sum(dim=(1, 2)).mean() / (4.0 * c * c * (h * w) ** 2)


# ----------------------------------------------------------------------------- FSP (NBA LNB)

def fsp_matrix(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """Flow-of-solution-procedure matrix of Yim et al. 2017 between two layer groups:
    ``feat_a`` is average-pooled to ``feat_b``'s spatial size, then ``F_a F_bᵀ / (H W)``: B×C_a×C_b."""
    h, w = feat_b.shape[-2:]
    if feat_a.shape[-2:] != (h, w):
        feat_a = F.adaptive_avg_pool2d(feat_a.float(), (h, w))
    a, b = feat_a.float().flatten(2), feat_b.float().flatten(2)
    return a @ b.transpose(1, 2) / (h * w)


def fsp_loss(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """``Σ_l mean((M^T_l − M^S_l)²)`` over adjacent layer-group pairs (teacher detached): NBA's
    L_LNB (Eq. 5) with the FSP matrix standing in for Eq. 4's learning matrix. ``reduction``:
    ``mean`` over the C_l×C_{l+1} entries (Yim et al.'s form), or ``sum`` (Eq. 5's squared norm);
    both average over the batch."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fsp_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    for i in range(len(feats_s) - 1):
        m_t = fsp_matrix(feats_t[i].detach(), feats_t[i + 1].detach())
        m_s = fsp_matrix(feats_s[i], feats_s[i + 1])
        sq = (m_t - m_s).pow(2)
        total = total + (sq.mean() if reduction == "mean" else sq.sum(dim=(1, 2)).mean())
    return total


# ----------------------------------------------------------------------------- KD (Hinton)

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 5.0,
            t_squared: bool = True) -> torch.Tensor:
    """``KL(softmax(u/T) || softmax(z/T))·T²`` with u the (detached) teacher logits (Hinton et al.
    2015, whose T² keeps the soft term's gradients at the hard term's scale); ``t_squared=False``
    drops the T² (NBA's L_PNB, Eq. 7)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t if t_squared else 1.0)


# ----------------------------------------------------------------------------- PGD

def pgd_untargeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float,
                   steps: int, random_start: bool = True, generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted L∞ PGD in pixel space: maximise CE(model(x+δ), y), ||δ||∞ ≤ eps, x+δ ∈ [0,1]
    (Madry et al. 2018; NBA Eq. 10).

    The model's mode is left as the caller set it, and gradients reach only δ (the model's
    parameter grads are untouched). ``mask`` (B×1×H×W or broadcastable) limits where δ may act.
    Returns the perturbed images, detached.
    """
    x = x.detach().float()
    if random_start:
        delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x)
    if mask is not None:
        delta = delta * mask
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g = grad.sign() if mask is None else grad.sign() * mask
            delta += step * g
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


def adversarial_training_loss(*, eps: float, step: float, steps: int, generator: torch.Generator | None = None):
    """The engine ``loss_fn`` of PGD adversarial training (Madry et al. 2018, Eq. 2.1): CE on
    ``pgd_untargeted``'s images of each batch, crafted with the model in eval mode so that the
    attack's passes leave the BatchNorm statistics alone."""
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        model.eval()
        x_adv = pgd_untargeted(model, x, y, eps=eps, step=step, steps=steps, generator=generator)
        model.train()
        ce = F.cross_entropy(model(x_adv).float(), y)
        return ce, {"ce": ce}
    return loss_fn


# ----------------------------------------------------------------------------- BatchNorm

@torch.no_grad()
@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Train-mode passes inside this block normalise with the batch's own statistics, as usual,
    but leave every BatchNorm's running statistics as they were (momentum 0 for the block)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0                       # running = (1 - 0)·running + 0·batch
    try:
        yield
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom


def recalibrate_bn(model: nn.Module, x_u8: torch.Tensor, batch_size: int = 128, channels_last: bool = False) -> None:
    """Recompute every BatchNorm's running statistics from ``x_u8`` (cumulative average), as MCR
    does at a curve point; the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                      # None = exact cumulative average
    model.train()
    y = torch.zeros(len(x_u8), dtype=torch.long, device=x_u8.device)
    for xb, _, _ in batches(x_u8, y, batch_size):
        model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
