"""DLP: active defense against backdoor attacks with a decoupled learning process.

Paper: Zonghao Ying and Bin Wu, "DLP: towards active defense against backdoor attacks with
decoupled learning process", Cybersecurity, 2023. No public code exists: this is the reference
implementation. Section names below are the paper's (its sections are not numbered).

What it does
------------
A model trained on a poisoned set learns the backdoor task faster than the main task (paper
Fig. 1, Sec. "Characteristic of backdoor learning"), so early on it is confident on poisoned
samples and unsure on clean ones. DLP splits training into stages (paper Fig. 2):

1. **SL** (supervised learning, Eq. 3): train a fresh model on the whole poisoned set for E1 = 10
   epochs (SGD, momentum 0.9, lr 0.01, batch 128; Sec. "Other settings").
2. **Filter** (Eq. 5, Sec. "Entropy-based filtering method"): the Shannon entropy in bits
   ``H(x) = −Σ_i p_i log2 p_i`` of the SL model's prediction for every training sample. The
   ``n·γ`` lowest-entropy samples are the filtered poisoned set D'_p; from each class (by its given
   label) the ``n·γ`` highest-entropy samples form the filtered clean set D'_c (γ = 1%). Their
   agreement with the true poison is logged with ``ctx.score_filter`` (the defense never sees the
   truth).
3. **AU** (active unlearning, Eq. 6): gradient ascent on D'_p, i.e. minimise ``−CE``, E2 = 20 epochs.
4. **ASSFT** (active semi-supervised fine-tuning, Eq. 7): FixMatch (Sohn et al. 2020) with D'_c as
   the labelled set and every other training image (D_o − D'_c, D'_p included) as the unlabelled
   set, labels dropped: ``L = CE(f(weak(x_l)), y) + λu·mean(mask·CE(f(strong(u)), ŷ))``,
   ŷ = argmax f(weak(u)), mask = [max softmax ≥ τ], τ = 0.8, λu = 1, μ = 7 unlabelled per labelled
   image (``fixmatch_loss``; the views are ``trainables.augment.weak`` / ``strong``).

Stage order. The paper's method is SL → AU → ASSFT: "we adjust the order of backdoor removal and
model fine-tuning. We first remove the backdoor using a filtered poisoned subset and then fine-tune
the model using a filtered clean subset" (Sec. "Method", "Overview"), and "the second stage is
active unlearning ... ASSFT is the final stage". Its Fig. 4 compares the variants SL-AU, SL-ASSFT
and SL-ASSFT-AU; ``stages`` selects any of the four (the filter always follows SL).

What the paper leaves open, and what this implementation chose
--------------------------------------------------------------
* **D'_c size** (``clean_per_class``). Paper, Sec. "Entropy-based filtering method": "the last
  n×γ samples are filtered out from each class"; its Table 5 remark ("only 50 samples" at γ =
  0.1% of CIFAR-10) fits n·γ in all. Default: the filter text, n·γ per class (``each``: 5,000
  labelled images on CIFAR-10 at γ 1%); ``split`` takes n·γ/C. Measured on CIFAR-10 BadNets
  (3 ASSFT epochs): ``split`` ends at BA 59.85 / ASR 11.57, ``each`` at 67.32 / 11.24, above the SL
  model's 65.69. Both sizes are rounded, at least 1; D'_p is excluded from D'_c.
* **AU learning rate and length** (``au_lr``, ``au_epochs``, ``au_stop_accuracy``). The paper
  names only its global default lr 0.01, at which gradient ascent (it has no minimum) sends the
  CE on D'_p up without bound: measured on CIFAR-10 BadNets, CE 4.9·10^4 and BA 10% (chance)
  after AU. Default: ABL's unlearning lr 5e-4 (the paper's inspiration, Li et al. 2021),
  constant, for the paper's E2 = 20 epochs. Once D'_p is unlearnt,
  further ascent keeps raising its CE by damaging the model, which costs BA that ASSFT then
  partly restores. Ending AU as soon as D'_p is unlearnt (``au_stop_accuracy``) keeps BA higher
  after AU, but the unlearning is then superficial: the next fine-tuning restores the trigger,
  even with λu = 0. So the early end is off by default. Since every image in D'_p carries the
  target label, AU also lowers the target class as a whole (its clean test accuracy falls, and
  ASSFT does not fully restore it). On a clean-label attack such as SIG, D'_p is made of real
  target-class images, and ASSFT's pseudo-labelled unlabelled term can teach the backdoor again.
* **AU BatchNorm** (``au_bn``; the paper says nothing): ``train`` (default, as in ABL's
  unlearning) lets the D'_p-only batches set the running statistics; ``eval`` leaves the SL
  model's alone; ``recalibrate`` recomputes them on the rest of the training set after AU.
  Measured on CIFAR-10 BadNets: ``eval`` diverges (NaN in AU epoch 5: nothing bounds the
  activations the ascent blows up); ``recalibrate`` ends AU at BA 52.0 / ASR 35.9 against train
  mode's 33.8 / 0.0, so much of what train-mode AU removes is the statistics, not the weights'
  backdoor; after ASSFT (train-mode BatchNorm, which replaces the statistics) ``train`` and
  ``recalibrate`` end identical (59.85 / 11.57). ``train`` stays; the choice matters only for
  ``sl-au``.
* **ASSFT's unlabelled set** (``assft_unlabelled``): the paper's is every image outside D'_c,
  D'_p included ("D_o − D'_c"); ``without_dp`` also leaves D'_p out, for clean-label attacks
  (SIG), where D'_p's pseudo-labels are its true labels and re-teach the trigger. Measured on
  CIFAR-10 SIG (3 ASSFT epochs, ``all``): AU takes ASR to 0, ASSFT brings it back to 72.76 (BA
  59.82) with a D'_c of n·γ/C per class and τ 0.95, and to 92.01 (BA 70.30) with the defaults
  below, which label 500 clean target-class images and pseudo-label more SIG images: the
  BadNets-chosen defaults do not carry over to a clean-label attack, and ``without_dp`` at
  these defaults does not rescue them (68.77 / 90.93).
* **AU augmentation** (``au_augment``): crop + flip, as in SL. The un-augmented poisoned images
  start at a CE close to 0, so an ascent on them starts slowly, then runs away (CIFAR-10 BadNets:
  BA 27.0 after AU without, 33.8 with).
* **FixMatch's threshold** (``tau``; the paper gives none, FixMatch uses 0.95): 0.8. On CIFAR-10
  BadNets with the ``each`` D'_c and 3 ASSFT epochs, τ 0.95 ends at 67.32 / 11.24 and τ 0.8 at
  67.39 / 9.28 (defense seed 1: 69.74 / 8.31 from an SL of 66.92): a lower threshold
  pseudo-labels more of the triggered images in the unlabelled set (the reading that fits), with
  the class the unlearnt model now gives them. A higher
  ASSFT lr trades BA for ASR instead (0.015 / 0.02 / 0.03: 66.34 / 8.88, 65.12 / 7.27, 64.20 /
  7.19).
* **Schedules, weight decay, augmentation**: SL and AU use a constant lr (the paper names no
  decay); ASSFT a cosine decay over its epochs (FixMatch decays its lr). Weight decay 5e-4
  everywhere (FixMatch's CIFAR setting; the paper gives none). SL trains on the engine's crop
  (pad 4) + flip; ASSFT's labelled batch gets the weak view, its unlabelled batch both views,
  drawn independently.
* **An ASSFT epoch** is one pass over the unlabelled set in batches of μ·B (B = ``batch_size``
  labelled images per step, cycled through reshuffled passes of D'_c): ``ceil(|U| / (μ·B))``
  steps, each seeing B labelled and μ·B unlabelled images (both views). On CIFAR-10 (γ = 1%,
  5,000 labelled images) that is 51 steps of 128 + 2×896 images. The paper gives no ASSFT budget; the default 50 such
  epochs cost about as much compute as 100 ordinary epochs. Labelled, weak and strong batches go
  through the model in one forward pass (FixMatch's reference, so BatchNorm sees all three); the
  weak logits are detached.
* **EMA** (``ema``): FixMatch evaluates an exponential moving average of the weights (0.999); the
  paper does not mention one, so it is off by default. When set, ASSFT returns (and logs) the
  EMA model, whose BatchNorm buffers are copied from the live model.

Measured behaviour of AU and ASSFT (synthetic set and CIFAR-10): docs/measurements.md.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.augment import strong, weak
from trainables.checkpoint import next_phase
from trainables.data.base import ImageSet
from trainables.data.loader import batches
from trainables.defenses._common import UNLEARN_BN, complement, epoch_logger, unlearn
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.engine import (EpochStats, Runtime, SGDConfig, StopTraining, accuracy, autocast, epoch_logs,
                               generator, make_sgd, on_device, predict_logits, prepare, restore_rng, set_lr, train)
from trainables.params import param
from trainables.registry import register_defense

STAGE_ORDERS = ("sl-au-assft", "sl-au", "sl-assft", "sl-assft-au")


@dataclass(frozen=True)
class Params:
    stages: str = param("sl-au-assft", "stage order after SL and the filter (paper: sl-au-assft; Fig. 4 "
                        "compares sl-au, sl-assft, sl-assft-au)", choices=STAGE_ORDERS)
    # -- SL and the filter -----------------------------------------------------------------------
    gamma: float = param(0.01, "γ, filtering rate: |D'_p| = n·γ, |D'_c| = n·γ per class (paper: 1%)",
                         low=1e-4, high=0.5)
    clean_per_class: str = param("each", "|D'_c| per class: each = n·γ (the paper's filter text, read "
                                 "literally) or split = n·γ/C (n·γ in all, as its 'only 50 samples' at γ 0.1%)",
                                 choices=("each", "split"))
    sl_epochs: int = param(10, "E1, supervised-learning epochs on the whole poisoned set (paper: 10)", low=1)
    sl_lr: float = param(0.01, "SL lr, constant (paper: 0.01)", low=0.0)
    # -- AU ----------------------------------------------------------------------------------------
    au_epochs: int = param(20, "E2, active-unlearning (gradient-ascent) epochs on D'_p (paper: 20)", low=0)
    au_lr: float = param(5e-4, "AU lr, constant (paper: unspecified beyond the 0.01 default; 5e-4 = ABL's "
                         "unlearning lr, see the module docstring)", low=0.0)
    au_stop_accuracy: float | None = param(None, "end AU early once the model's accuracy on D'_p (its given "
                                           "labels, eval mode) is at or below this; None = always E2 epochs "
                                           "(paper: no early end)", low=0.0, high=1.0)
    au_augment: bool = param(True, "crop + flip the D'_p images during AU, as in SL (ABL's unlearning: none)")
    au_bn: str = param("train", "BatchNorm during AU: train (statistics from D'_p batches, as ABL's code), eval "
                       "(left alone) or recalibrate (train, then recomputed on the rest of the set); paper: "
                       "not given", choices=UNLEARN_BN)
    # -- ASSFT (FixMatch) ----------------------------------------------------------------------
    assft_epochs: int = param(50, "ASSFT epochs, one = a pass over the unlabelled set (paper: unspecified)", low=0)
    assft_lr: float = param(0.01, "ASSFT initial lr, cosine decay (paper: 0.01)", low=0.0)
    tau: float = param(0.8, "τ, FixMatch pseudo-label confidence threshold (paper: not given; FixMatch: 0.95; "
                       "0.8 measured on CIFAR-10, see the module docstring)", low=0.0, high=1.0)
    lambda_u: float = param(1.0, "λu, weight of the unlabelled loss (FixMatch: 1)", low=0.0)
    assft_unlabelled: str = param("all", "ASSFT's unlabelled set: every image outside D'_c (paper: all) or "
                                  "also without D'_p (without_dp)", choices=("all", "without_dp"))
    mu: int = param(7, "μ, unlabelled images per labelled image in a step (FixMatch: 7)", low=1)
    ema: float | None = param(None, "EMA decay of the ASSFT weights, None = off (FixMatch: 0.999; paper: none)",
                              low=0.0, high=1.0)
    # -- optimiser (every stage) ---------------------------------------------------------------
    batch_size: int = param(128, "batch size; ASSFT: labelled images per step (paper: 128)", low=1)
    momentum: float = param(0.9, "SGD momentum (paper: 0.9)", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay (paper: none given; FixMatch's 5e-4)", low=0.0)

    def sgd(self, epochs: int, lr: float, schedule: str) -> SGDConfig:
        return SGDConfig(epochs=epochs, lr=lr, batch_size=self.batch_size, momentum=self.momentum,
                         weight_decay=self.weight_decay, schedule=schedule)


# ----------------------------------------------------------------------------- filter (Eq. 5)

def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """``H = −Σ_i p_i log2 p_i`` of the softmax of each row (Eq. 5), in bits."""
    p = logits.float().softmax(dim=1)
    return -torch.special.xlogy(p, p).sum(dim=1) / math.log(2.0)


def split_by_entropy(entropy: torch.Tensor, labels: torch.Tensor, gamma: float, num_classes: int,
                     clean_per_class: str = "each") -> tuple[torch.Tensor, torch.Tensor]:
    """(D'_p, D'_c) as sorted index tensors: the ``n·γ`` lowest-entropy samples, and per class the
    ``n·γ`` (``clean_per_class='split'``: ``n·γ/C``) highest-entropy samples among the rest."""
    entropy, labels = entropy.cpu(), labels.cpu()
    n = len(entropy)
    k_p = min(n, max(1, round(n * gamma)))
    per_class = n * gamma if clean_per_class == "each" else n * gamma / num_classes
    k_c = max(1, round(per_class))
    poisoned = entropy.argsort()[:k_p]
    candidate = torch.ones(n, dtype=torch.bool)
    candidate[poisoned] = False
    clean = []
    for c in range(num_classes):
        members = (candidate & (labels == c)).nonzero(as_tuple=True)[0]
        clean.append(members[entropy[members].argsort(descending=True)[:k_c]])
    return poisoned.sort().values, torch.cat(clean).sort().values


def entropy_filter(model: nn.Module, data: ImageSet, p: Params, num_classes: int, rt: Runtime
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter the training set with the SL model (eval mode, no augmentation): (D'_p, D'_c)."""
    return split_by_entropy(entropy_bits(predict_logits(model, data.x, rt)), data.y, p.gamma, num_classes,
                            p.clean_per_class)


# ----------------------------------------------------------------------------- AU (Eq. 6)

def active_unlearning(model: nn.Module, poisoned: ImageSet, rest_x: torch.Tensor, p: Params, ctx: DefenseContext, *,
                      seed: int) -> None:
    """Gradient ascent on D'_p for up to E2 epochs (Eq. 6), IN PLACE; logs every epoch with
    ``dp_accuracy`` (the model's accuracy on D'_p under its given labels, eval mode) and ends
    early once that is at most ``au_stop_accuracy``. ``rest_x``: the training images outside D'_p
    (for ``au_bn='recalibrate'``)."""
    def on_epoch(epoch: int, logs: dict) -> dict:
        dp_accuracy = accuracy(model, poisoned, ctx.rt)
        ctx.log_epoch("au", {**logs, "dp_accuracy": dp_accuracy}, model)
        if p.au_stop_accuracy is not None and dp_accuracy <= p.au_stop_accuracy:
            raise StopTraining
        return {"dp_accuracy": dp_accuracy}

    # unlearning_loss maximises the CE on D'_p (Eq. 6): the engine minimises −CE
    unlearn(model, poisoned, rest_x, p.sgd(p.au_epochs, p.au_lr, "constant"), ctx, bn=p.au_bn, seed=seed,
            augment=p.au_augment, on_epoch=on_epoch)


# ----------------------------------------------------------------------------- ASSFT (Eq. 7)

def fixmatch_loss(logits_x: torch.Tensor, y: torch.Tensor, logits_u_weak: torch.Tensor,
                  logits_u_strong: torch.Tensor, tau: float, lambda_u: float) -> tuple[torch.Tensor, dict]:
    """FixMatch's loss, DLP's Eq. 7 with L_2 = FixMatch and no extra regulariser R:
    ``CE(logits_x, y) + λu · mean_u( [max p_weak ≥ τ] · CE(logits_u_strong, argmax p_weak) )``.

    The pseudo-labels and the mask come from the detached weak-view logits; the mean runs over
    ALL unlabelled samples (masked ones count as zero), as in FixMatch."""
    lx = F.cross_entropy(logits_x.float(), y)
    probs = logits_u_weak.detach().float().softmax(dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= tau).float()
    lu = (F.cross_entropy(logits_u_strong.float(), pseudo, reduction="none") * mask).mean()
    return lx + lambda_u * lu, {"lx": lx, "lu": lu, "mask": mask.mean()}


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·w`` for the weights; BatchNorm buffers copied."""
    for e, w in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(w.detach(), 1.0 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


class LabelledStream:
    """Endless labelled index batches: consecutive reshuffled passes, cut into ``batch``-sized
    pieces. ``buffer`` (what is left of the current pass) is its whole state."""

    def __init__(self, n: int, batch: int, gen: torch.Generator, device):
        self.n, self.batch, self.gen = n, batch, gen
        self.buffer = torch.empty(0, dtype=torch.long, device=device)

    def __next__(self) -> torch.Tensor:
        while len(self.buffer) < self.batch:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, device=self.buffer.device, generator=self.gen)])
        out, self.buffer = self.buffer[:self.batch], self.buffer[self.batch:]
        return out


def assft(model: nn.Module, labelled: ImageSet, unlabelled_x: torch.Tensor, p: Params, ctx: DefenseContext,
          *, seed: int, stage: str = "assft") -> nn.Module:
    """FixMatch fine-tuning (module docstring: one epoch = one pass over the unlabelled set);
    returns the trained model (the EMA copy when ``p.ema`` is set). Logs every epoch; a
    checkpointed phase of the run (``trainables.checkpoint``) like the engine's loop."""
    if len(labelled) == 0 or len(unlabelled_x) == 0:
        raise ValueError(f"{stage}: FixMatch needs labelled and unlabelled images "
                         f"(got {len(labelled)} and {len(unlabelled_x)})")
    rt = ctx.rt
    lab = on_device(labelled, rt)
    ux = unlabelled_x.to(rt.device)
    gen = generator(rt, seed)
    cfg = p.sgd(p.assft_epochs, p.assft_lr, "cosine")
    opt = make_sgd(model.parameters(), cfg)
    ema_model = copy.deepcopy(model) if p.ema is not None else None
    b = min(p.batch_size, len(lab))
    stream = LabelledStream(len(lab), b, gen, rt.device)
    dummy = torch.zeros(len(ux), dtype=torch.long, device=rt.device)
    checkpoint = next_phase()
    saved = checkpoint.load() if checkpoint is not None else None
    first = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        if ema_model is not None:
            ema_model.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        stream.buffer = saved["stream"].to(rt.device)
        restore_rng(saved, gen)
        first = int(saved["epoch"])
    for epoch in range(first, cfg.epochs):
        set_lr(opt, cfg.lr_at(epoch))
        model.train()
        stats, start = EpochStats(), time.perf_counter()
        for u, _, _ in batches(ux, dummy, p.mu * b, generator=gen, shuffle=True):
            li = next(stream)
            xl = weak(lab.x[li], gen)
            inputs = torch.cat([xl, weak(u, gen), strong(u, gen)])
            if rt.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(rt):
                logits = model(inputs)
            lx, luw, lus = logits.float().split([len(li), len(u), len(u)])
            loss, logs = fixmatch_loss(lx, lab.y[li], luw, lus, p.tau, p.lambda_u)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema_model is not None:
                ema_update(ema_model, model, p.ema)
            stats.add({"loss": loss, **logs}, len(li) + len(u))
        logs = epoch_logs(stats, epoch, opt, start, where=stage)
        ctx.log_epoch(stage, logs, ema_model if ema_model is not None else model)
        if checkpoint is not None:
            checkpoint.save({"epoch": epoch + 1, "epochs": cfg.epochs, "done": epoch + 1 == cfg.epochs,
                             "model": model.state_dict(), "ema": ema_model.state_dict() if ema_model is not None else {},
                             "opt": opt.state_dict(), "stream": stream.buffer, "gen": gen.get_state(),
                             "rng": torch.get_rng_state()})
    out = ema_model if ema_model is not None else model
    return out.eval()


# ----------------------------------------------------------------------------- the defense

@register_defense
class DLP(Defense):
    name = "dlp"
    kind = "training-time"
    Params = Params
    summary = "SL, entropy filter, gradient-ascent unlearning on D'_p, FixMatch fine-tuning with D'_c labelled"
    paper = "Ying & Wu, DLP: towards active defense against backdoor attacks with decoupled learning process, Cybersecurity 2023"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # SL on the whole set, AU on D'_p (n·γ); an ASSFT epoch sees the unlabelled set in two
        # views and |U|/μ labelled images: about (2 + 1/μ)·n passes
        passes = p.sl_epochs * n_images + p.au_epochs * p.gamma * n_images
        passes += p.assft_epochs * n_images * (2 + 1 / p.mu)
        return Cost(passes=passes, logged_epochs=p.sl_epochs + p.au_epochs + p.assft_epochs)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p, rt, data = self.params, ctx.rt, ctx.train
        model = prepare(ctx.build_model(), rt)

        # 1. SL on the whole poisoned set (Eq. 3)
        train(model, data, p.sgd(p.sl_epochs, p.sl_lr, "constant"), rt, seed=ctx.seed,
              on_epoch=epoch_logger(ctx, "sl", model))

        # 2. entropy filter (Eq. 5)
        poisoned, clean = entropy_filter(model, data, p, ctx.num_classes, rt)
        ctx.log_epoch("filter", filter_logs(ctx, poisoned, clean))

        # 3./4. AU and ASSFT in the chosen order
        for i, stage in enumerate(p.stages.split("-")[1:]):
            if stage == "au":
                active_unlearning(model, data.subset(poisoned), data.x[complement(len(data), poisoned)], p, ctx,
                                  seed=ctx.seed + 1 + i)
            else:
                leave_out = torch.cat([clean, poisoned]) if p.assft_unlabelled == "without_dp" else clean
                unlabelled = data.x[complement(len(data), leave_out)]
                model = assft(model, data.subset(clean), unlabelled, p, ctx, seed=ctx.seed + 1 + i)
        return model.eval()


def filter_logs(ctx: DefenseContext, poisoned: torch.Tensor, clean: torch.Tensor) -> dict:
    """Sizes of D'_p and D'_c and how they match the true poison (``ctx.score_filter``: logging
    only). For D'_c, ``clean_set_poison_fraction`` is the score's precision (lower is better)."""
    logs = {"filtered_poisoned": float(len(poisoned)), "filtered_clean": float(len(clean))}
    logs.update({f"filter_{k}": float(v) for k, v in ctx.score_filter(poisoned).items()})
    clean_score = ctx.score_filter(clean)
    if "precision" in clean_score:
        logs["clean_set_poison_fraction"] = float(clean_score["precision"])
    return logs
