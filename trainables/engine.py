"""The one training / evaluation loop that attacks and defenses call.

* data: device-resident uint8 tensors, batches gathered by index, crop/flip on the device
  (``trainables.data.loader``);
* mixed precision: bf16 autocast on CUDA, and on CPUs whose oneDNN has fast bf16 kernels
  (AVX-512 BF16 / AMX); on CPUs without them bf16 is emulated and ~25x slower, so fp32 is kept;
* channels-last memory format (faster on every device measured);
* seeded: the same seed gives the same batches, augmentations and initial weights.

A method with its own loss passes ``loss_fn(model, x, y, idx) -> (loss, logs)``; everything else
(optimiser, schedule, NaN detection, per-epoch averages, progress callback) lives here once.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.base import ImageSet
from trainables.data.loader import batches


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial fails instead of reporting garbage."""


# ----------------------------------------------------------------------------- runtime

def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds without the probe: stay in fp32
        return False


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed. ``amp`` is the autocast dtype or None."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool

    @property
    def description(self) -> str:
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "fp32")
        return f"{self.device.type} {amp}{' channels-last' if self.channels_last else ''}"


def pick_runtime(device: str | None = None, amp: bool | None = None) -> Runtime:
    """The fastest sensible runtime: CUDA when present, bf16 where the hardware has it.

    ``device``/``amp`` override the choice; env ``SWEEP_DEVICE``, ``SWEEP_AMP=0|1`` and
    ``SWEEP_CHANNELS_LAST=0|1`` too.
    """
    device = device or os.environ.get("SWEEP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if amp is None and os.environ.get("SWEEP_AMP") in ("0", "1"):
        amp = os.environ["SWEEP_AMP"] == "1"
    if dev.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = _cpu_has_fast_bf16()
    use_amp = fast if amp is None else amp
    # channels-last is faster on every device measured (docs/measurements.md)
    channels_last = os.environ.get("SWEEP_CHANNELS_LAST", "1") != "0"
    return Runtime(device=dev, amp=torch.bfloat16 if use_amp else None, channels_last=channels_last)


def autocast(rt: Runtime):
    if rt.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp)


def prepare(model: nn.Module, rt: Runtime) -> nn.Module:
    """Move a model to the runtime's device and memory format."""
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _fmt(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


def on_device(data: ImageSet, rt: Runtime) -> ImageSet:
    if data.x.device == rt.device:
        return data
    return ImageSet(data.x.to(rt.device), data.y.to(rt.device))


def generator(rt: Runtime, seed: int) -> torch.Generator:
    return torch.Generator(device=rt.device).manual_seed(int(seed))


# ----------------------------------------------------------------------------- optimisation

@dataclass(frozen=True)
class SGDConfig:
    """SGD with momentum and a per-epoch schedule. The defaults are the usual setting for training
    the backdoored CIFAR model: lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 100 epochs,
    cosine decay.

    schedule: ``cosine`` | ``constant`` | ``multistep`` (lr × gamma at each milestone) |
    ``piecewise`` (lr becomes ``lr_values[i]`` at ``milestones[i]``, e.g. NAD's 0.1→0.01→1e-4).
    """

    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    lr_values: tuple[float, ...] = ()
    max_grad_norm: float | None = None     # clip the global gradient norm; None = off (the papers')

    def __post_init__(self):
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive (or None: no clipping)")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr >= 0:
            raise ValueError(f"bad training budget: epochs={self.epochs} batch_size={self.batch_size} lr={self.lr}")
        if self.schedule not in ("cosine", "constant", "multistep", "piecewise"):
            raise ValueError(f"unknown schedule {self.schedule!r} (cosine, constant, multistep, piecewise)")
        if self.schedule == "piecewise" and len(self.lr_values) != len(self.milestones):
            raise ValueError("piecewise schedule needs one lr value per milestone")

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based ``epoch``."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / max(1, self.epochs)))
        if self.schedule == "multistep":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "piecewise":
            lr = self.lr
            for m, v in zip(self.milestones, self.lr_values):
                if epoch >= m:
                    lr = v
            return lr
        return self.lr


def make_sgd(params: Iterable[torch.nn.Parameter], cfg: SGDConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.lr_at(0), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- the loop

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
EpochHook = Callable[[int, dict], dict | None]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
    loss = F.cross_entropy(model(x), y)
    return loss, {"ce": loss}


@dataclass
class EpochStats:
    sums: dict = field(default_factory=dict)
    count: int = 0

    def add(self, logs: dict, n: int) -> None:
        for k, v in logs.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums.get(k, 0) + v * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}


def epoch_logs(stats: EpochStats, epoch: int, opt: torch.optim.Optimizer, start: float,
               where: str = "") -> dict:
    """The end of 0-based ``epoch`` begun at ``perf_counter()`` time ``start``: the mean terms plus
    ``epoch``, ``lr``, ``seconds`` and ``images_per_second``. A NaN or infinite mean loss raises
    ``TrainingDiverged`` (its message starts with ``where``, e.g. a stage name)."""
    logs = stats.means()
    if not math.isfinite(logs["loss"]):
        raise TrainingDiverged(f"{where + ': ' if where else ''}loss is {logs['loss']} at epoch {epoch + 1}")
    seconds = time.perf_counter() - start
    logs.update(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], seconds=seconds,
                images_per_second=stats.count / max(seconds, 1e-9))
    return logs


def train(model: nn.Module, data: ImageSet, cfg: SGDConfig, rt: Runtime, *, seed: int,
          loss_fn: LossFn = cross_entropy_loss, augment: bool = True,
          params: Iterable[torch.nn.Parameter] | None = None,
          on_epoch: EpochHook | None = None, progress: Callable[[str], None] | None = None,
          train_mode: bool = True) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` epochs; return the per-epoch history.

    ``loss_fn`` returns the loss to minimise and a dict of terms to average and log.
    ``on_epoch(epoch, logs)`` runs after every epoch (evaluation, reporting); what it returns is
    merged into that epoch's history entry. ``params`` restricts what the optimiser updates.
    """
    data = on_device(data, rt)
    gen = generator(rt, seed)
    opt = make_sgd(params if params is not None else model.parameters(), cfg)
    history = []
    for epoch in range(cfg.epochs):
        set_lr(opt, cfg.lr_at(epoch))
        model.train(train_mode)
        stats, start = EpochStats(), time.perf_counter()
        for x, y, idx in batches(data.x, data.y, cfg.batch_size, generator=gen, shuffle=True, augment=augment):
            with autocast(rt):
                loss, logs = loss_fn(model, _fmt(x, rt), y, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], cfg.max_grad_norm)
            opt.step()
            stats.add({"loss": loss, **logs}, len(y))
        logs = epoch_logs(stats, epoch, opt, start)
        if on_epoch is not None:
            logs.update(on_epoch(epoch + 1, logs) or {})
        history.append(logs)
        if progress is not None:
            progress(format_epoch(logs, cfg.epochs))
    model.eval()
    return history


def format_epoch(logs: dict, epochs: int) -> str:
    keys = [k for k in ("loss", "ba", "asr", "ra") if k in logs]
    body = " ".join(f"{k}={logs[k]:.4f}" if k == "loss" else f"{k}={100 * logs[k]:.2f}%" for k in keys)
    return (f"epoch {logs['epoch']}/{epochs} {body} lr={logs['lr']:.4g} "
            f"{logs['seconds']:.1f}s {logs['images_per_second']:.0f} img/s")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_logits(model: nn.Module, x_u8: torch.Tensor, rt: Runtime, batch_size: int = 500) -> torch.Tensor:
    """Float32 logits for uint8 images, in eval mode, on the runtime's device."""
    was_training = model.training
    model.eval()
    out = []
    x_dev = x_u8.to(rt.device)
    for xb, _, _ in batches(x_dev, torch.zeros(len(x_dev), dtype=torch.long, device=rt.device), batch_size):
        with autocast(rt):
            out.append(model(_fmt(xb, rt)).float())
    model.train(was_training)
    if not out:
        return torch.zeros(0, getattr(model, "num_classes", 0), device=rt.device)
    return torch.cat(out)


def predict(model: nn.Module, x_u8: torch.Tensor, rt: Runtime, batch_size: int = 500) -> torch.Tensor:
    return predict_logits(model, x_u8, rt, batch_size).argmax(1)


def accuracy(model: nn.Module, data: ImageSet, rt: Runtime) -> float:
    if len(data) == 0:
        return float("nan")
    return (predict(model, data.x, rt) == data.y.to(rt.device)).float().mean().item()
