"""FP: fine-pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks
on Deep Neural Networks", RAID 2018).

Backdoor neurons tend to stay dormant on clean inputs. Fine-pruning (1) ranks the channels of the
last convolutional feature map by their mean activation on clean data, (2) prunes them in
increasing order of activation, and (3) fine-tunes the pruned network on the clean data to
recover the accuracy the pruning cost.

Here:
* the feature map is the output of ``model.final`` (BN-ReLU for WRN / PreAct nets, see
  ``models/base.py``), the map that global average pooling feeds to ``fc``. A channel's mean
  activation over the clean subset and all positions is the mean of ``model.penultimate(x)``
  (the pooled map), so no hook is needed; and since pool and ``fc`` are linear, removing channel c
  of that map is exactly removing column c of ``fc.weight``. Pruning is therefore a column mask on
  ``fc.weight`` (a ``torch.nn.utils.parametrize`` mask during fine-tuning, so pruned channels stay
  pruned; folded into a plain weight at the end, so the result is an ordinary state_dict).
  ``penultimate(x)`` of the result still shows the pruned channels; the logits do not use them.
* the amount: channels are pruned in steps of ``step`` (a fraction of the channels, at least one
  channel) until the clean-subset accuracy falls below ``(1 − max_drop)`` times its unpruned
  value (default 10 % relative); the last amount within the budget is kept
  (capped at ``max_ratio``). ``prune_ratio`` instead fixes the amount. Only the clean subset is
  used for this choice.
* fine-tuning: the shared ``finetune`` helper, lr 0.01 (Liu et al. fine-tune at a small lr),
  cosine decay, batch 64, 10 epochs (the paper does not fix a budget).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from trainables.data.base import ImageSet
from trainables.data.loader import batches
from trainables.defenses._common import finetune
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.engine import Runtime, SGDConfig, autocast, prepare
from trainables.params import param
from trainables.registry import register_defense


@dataclass(frozen=True)
class Params:
    max_drop: float = param(0.10, "stop pruning when clean-subset accuracy drops by more than this, relative (default 10%)",
                            low=0.0, high=1.0)
    prune_ratio: float | None = param(None, "prune this fixed fraction of channels instead (None = use max_drop)",
                                      low=0.0, high=1.0)
    step: float = param(0.05, "fraction of channels pruned per step (1-5% typical)", low=1e-4, high=1.0)
    max_ratio: float = param(0.95, "never prune more than this fraction of channels", low=0.0, high=1.0)
    epochs: int = param(10, "fine-tuning epochs after pruning (paper: unspecified)", low=0, high=500)
    lr: float = param(0.01, "fine-tuning learning rate", low=1e-5, high=1.0)
    batch_size: int = param(64, "fine-tuning batch size", low=1)
    weight_decay: float = param(5e-4, "fine-tuning weight decay", low=0.0, high=0.1)

    def sgd(self) -> SGDConfig:
        return SGDConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, momentum=0.9,
                         weight_decay=self.weight_decay, schedule="cosine")


class ColumnMask(nn.Module):
    """``W ↦ W · mask`` over the input columns of a linear layer (a parametrization)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.keep.to(weight.dtype)


@torch.no_grad()
def pooled_features(model: nn.Module, data: ImageSet, rt: Runtime, batch_size: int = 500) -> torch.Tensor:
    """``model.penultimate(x)`` (float32) for every clean image, in eval mode: N×C."""
    model.eval()
    x = data.x.to(rt.device)
    out = []
    for xb, _, _ in batches(x, torch.zeros(len(x), dtype=torch.long, device=rt.device), batch_size):
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(rt):
            out.append(model.penultimate(xb).float())
    return torch.cat(out)


def choose_amount(feats: torch.Tensor, labels: torch.Tensor, fc: nn.Linear, order: torch.Tensor,
                  p: Params) -> tuple[int, list[tuple[int, float]]]:
    """How many channels to prune (the first ``k`` of ``order``) and the (k, accuracy) trace."""
    n = feats.shape[1]
    w, b = fc.weight.detach().float(), fc.bias.detach().float() if fc.bias is not None else None

    def acc(k: int) -> float:
        keep = torch.ones(n, device=feats.device)
        keep[order[:k]] = 0
        logits = nn.functional.linear(feats * keep, w, b)
        return (logits.argmax(1) == labels).float().mean().item()

    base = acc(0)
    if p.prune_ratio is not None:
        k = min(n - 1, round(p.prune_ratio * n))
        return k, [(0, base), (k, acc(k))]
    stride, limit = max(1, round(p.step * n)), min(n - 1, int(p.max_ratio * n))
    trace, chosen = [(0, base)], 0
    for k in range(stride, limit + 1, stride):
        a = acc(k)
        trace.append((k, a))
        if a < (1.0 - p.max_drop) * base:
            break
        chosen = k
    return chosen, trace


@register_defense
class FinePruning(Defense):
    name = "fp"
    kind = "post-training"
    Params = Params
    summary = "prune the last feature map's dormant channels, then fine-tune on the clean subset"
    paper = "Liu et al., Fine-Pruning, RAID 2018"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # pruning only measures activations (forward passes); fine-tuning trains
        return Cost(passes=p.epochs * n_images, logged_epochs=p.epochs)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p = self.params
        model = prepare(ctx.model, ctx.rt)
        labels = ctx.clean.y.to(ctx.rt.device)
        feats = pooled_features(model, ctx.clean, ctx.rt)
        order = feats.mean(0).argsort()                         # increasing mean activation
        k, trace = choose_amount(feats, labels, model.fc, order, p)
        keep = torch.ones(feats.shape[1], device=ctx.rt.device)
        keep[order[:k]] = 0
        parametrize.register_parametrization(model.fc, "weight", ColumnMask(keep))
        ctx.log_epoch("fp-prune", {"pruned": float(k), "prune_ratio": k / feats.shape[1],
                                   "clean_acc_before": trace[0][1],
                                   "clean_acc_pruned": dict(trace).get(k, trace[0][1])}, model)
        finetune(model, ctx.clean, p.sgd(), ctx, stage="fp-finetune")
        parametrize.remove_parametrizations(model.fc, "weight", leave_parametrized=True)
        return model.eval()
