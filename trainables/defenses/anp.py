"""ANP: adversarial neuron pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021).

Backdoor neurons are the ones whose small perturbation most easily flips the model. Every
BatchNorm channel k gets a mask m_k ∈ [0, 1] (init 1) and multiplicative noise on its affine
parameters:

    γ_k ← γ_k · (m_k + δ_k),   β_k ← β_k · (1 + ξ_k),   δ, ξ ∈ [−ε, ε]           (ANP Eq. 4)

Per minibatch of the clean subset: δ, ξ ~ U(−ε, ε), then one signed gradient-ascent step of size ε
on CE (clipped back to [−ε, ε]) — the adversarial neuron perturbation; then the masks take one
SGD step on

    α · CE(x; m) + (1 − α) · CE(x; m + δ, 1 + ξ)                                (ANP Eq. 5)

and are clamped to [0, 1]. Finally the neurons with m ≤ τ (or the k smallest masks) are pruned:
their BatchNorm weight γ is set to 0 (as ANP's pruning script does; β is kept).

Generic over architectures: every ``nn.BatchNorm2d`` with affine parameters is masked, through
``torch.func.functional_call`` overriding its ``weight``/``bias`` — no module is replaced. The
mask optimisation runs on a copy (its BatchNorm statistics move, as in ANP's code, which trains in
``train()`` mode); pruning is applied to the original model.

Paper setting: SGD lr 0.2 momentum 0.9 on the masks, 2,000 iterations of batch 128, ε = 0.4,
α = 0.2, τ = 0.2; ANP used 1% clean data, here the clean subset given. The engine loop runs whole
epochs, so the iterations are rounded up to whole epochs over the clean subset (each epoch is
logged with the soft-masked model). Augmentation: crop + flip (as ANP's data loader).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trainables.defenses._common import epoch_logger
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.engine import SGDConfig, prepare, train
from trainables.params import param
from trainables.registry import register_defense


@dataclass(frozen=True)
class Params:
    eps: float = param(0.4, "perturbation budget ε of δ and ξ (ANP: 0.4)", low=0.0, high=1.0)
    alpha: float = param(0.2, "weight α of the natural loss (ANP: 0.2)", low=0.0, high=1.0)
    iterations: int = param(2000, "mask-optimisation iterations, rounded up to whole epochs (ANP: 2000)",
                            low=1, high=100000)
    lr: float = param(0.2, "mask SGD lr (ANP: 0.2, momentum 0.9)", low=1e-5, high=10.0)
    batch_size: int = param(128, "batch size (ANP: 128)", low=1)
    prune_by: str = param("threshold", "prune masks ≤ threshold, or the `prune_number` smallest",
                          choices=("threshold", "number"))
    threshold: float = param(0.2, "pruning threshold τ on the mask (ANP: 0.2)", low=0.0, high=1.0)
    prune_number: int = param(0, "neurons pruned when prune_by = number", low=0)

    def sgd(self, n_images: int) -> SGDConfig:
        per_epoch = max(1, math.ceil(n_images / self.batch_size))
        return SGDConfig(epochs=max(1, math.ceil(self.iterations / per_epoch)), lr=self.lr,
                         batch_size=self.batch_size, momentum=0.9, weight_decay=0.0, schedule="constant")


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every affine ``BatchNorm2d`` by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}


class NeuronPerturbation:
    """Masks m (trained) and noises δ, ξ (adversarial) for the named BatchNorms."""

    def __init__(self, bns: dict[str, nn.BatchNorm2d]):
        self.bns = bns
        self.mask = {n: torch.ones_like(m.weight, requires_grad=True) for n, m in bns.items()}
        self.delta = {n: torch.zeros_like(m.weight) for n, m in bns.items()}
        self.xi = {n: torch.zeros_like(m.bias) for n, m in bns.items()}

    def overrides(self, noisy: bool) -> dict[str, torch.Tensor]:
        """BatchNorm affine parameters ``γ·(m + δ)``, ``β·(1 + ξ)`` (noisy, Eq. 4) or ``γ·m``, ``β``."""
        out = {}
        for n, bn in self.bns.items():
            gamma, beta = bn.weight.detach(), bn.bias.detach()
            if noisy:
                out[f"{n}.weight"] = gamma * (self.mask[n] + self.delta[n])
                out[f"{n}.bias"] = beta * (1 + self.xi[n])
            else:
                out[f"{n}.weight"] = gamma * self.mask[n]
        return out

    def forward(self, model: nn.Module, x: torch.Tensor, noisy: bool) -> torch.Tensor:
        return functional_call(model, self.overrides(noisy), (x,))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                gen: torch.Generator) -> None:
        """δ, ξ ~ U(−ε, ε), then one signed ascent step of size ε on CE, clipped to [−ε, ε]."""
        noise = []
        for n in self.bns:
            for t in (self.delta[n], self.xi[n]):
                t.copy_((torch.rand(t.shape, generator=gen, device=t.device) * 2 - 1) * eps)
                t.requires_grad_(True)
                noise.append(t)
        loss = F.cross_entropy(self.forward(model, x, noisy=True).float(), y)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for t, g in zip(noise, grads):
                t.add_(eps * g.sign()).clamp_(-eps, eps)
                t.requires_grad_(False)

    def clamp_(self) -> None:
        with torch.no_grad():
            for m in self.mask.values():
                m.clamp_(0, 1)


def anp_loss(pert: NeuronPerturbation, p: Params, gen: torch.Generator):
    """The engine ``loss_fn`` of Eq. 5 (the adversarial noise step happens first, inside)."""
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        pert.clamp_()                              # the projection after the previous mask step
        rob = x.new_zeros((), dtype=torch.float32)
        if p.eps > 0:
            pert.perturb(model, x, y, p.eps, gen)
            rob = F.cross_entropy(pert.forward(model, x, noisy=True).float(), y)
        nat = F.cross_entropy(pert.forward(model, x, noisy=False).float(), y)
        return p.alpha * nat + (1 - p.alpha) * rob, {"nat": nat, "rob": rob}
    return loss_fn


class _Masked(nn.Module):
    """The model with its soft masks applied (for the per-epoch log only)."""

    def __init__(self, model: nn.Module, pert: NeuronPerturbation):
        super().__init__()
        self.model, self.pert = model, pert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.pert.forward(self.model, x, noisy=False)


def pruned_neurons(mask: dict[str, torch.Tensor], p: Params) -> dict[str, torch.Tensor]:
    """BatchNorm name -> indices of the neurons to prune."""
    names = list(mask)
    flat = torch.cat([mask[n].detach().flatten() for n in names])
    owner = torch.cat([torch.full((mask[n].numel(),), i) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(mask[n].numel()) for n in names])
    if p.prune_by == "threshold":
        chosen = torch.nonzero(flat.cpu() <= p.threshold).flatten()
    else:
        chosen = flat.cpu().argsort()[:min(p.prune_number, len(flat))]
    return {n: local[chosen[owner[chosen] == i]] for i, n in enumerate(names)}


@register_defense
class ANP(Defense):
    name = "anp"
    kind = "post-training"
    Params = Params
    summary = "learn BatchNorm neuron masks under adversarial neuron perturbation; prune low masks"
    paper = "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # each iteration: the adversarial neuron perturbation step and the mask step
        epochs = p.sgd(n_images).epochs
        return Cost(passes=2 * epochs * n_images, logged_epochs=epochs)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p, rt = self.params, ctx.rt
        model = prepare(ctx.model, rt)
        work = copy.deepcopy(model)                # its BN statistics move during optimisation
        work.requires_grad_(False)
        pert = NeuronPerturbation(batchnorms(work))
        gen = torch.Generator(device=rt.device).manual_seed(ctx.seed + 5)
        masked = _Masked(work, pert)
        train(work, ctx.clean, p.sgd(len(ctx.clean)), rt, seed=ctx.seed + 1,
              params=list(pert.mask.values()), loss_fn=anp_loss(pert, p, gen),
              on_epoch=epoch_logger(ctx, "anp-mask", masked), generators=(gen,))
        pert.clamp_()
        prune = pruned_neurons(pert.mask, p)
        bns = batchnorms(model)
        with torch.no_grad():
            for name, index in prune.items():
                bns[name].weight[index.to(rt.device)] = 0.0
        total = sum(m.numel() for m in pert.mask.values())
        count = sum(len(i) for i in prune.values())
        ctx.log_epoch("anp-prune", {"pruned": float(count), "prune_fraction": count / max(1, total)}, model)
        return model.eval()
