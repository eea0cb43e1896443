"""The one training / evaluation loop that attacks and defenses call.

* data: device-resident uint8 tensors, batches gathered by index, crop/flip on the device
  (``trainables.data.loader``);
* device: CUDA when present, except inside a Ray task or actor that Ray granted no GPU (a
  CPU trial on a GPU node stays off the GPUs that other trials were granted);
* mixed precision (``choose_precision``): bf16 autocast on GPUs that run it natively (compute
  capability >= 8.0), fp16 autocast with a gradient scaler on older GPUs (their bf16 is
  emulated), bf16 on CPUs whose oneDNN has fast bf16 kernels (AVX-512 BF16 / AMX); on CPUs
  without them bf16 is emulated and ~25x slower, so fp32 is kept;
* channels-last memory format (faster on every device measured);
* seeded: the same seed gives the same batches, augmentations and initial weights.

A method with its own loss passes ``loss_fn(model, x, y, idx) -> (loss, logs)``; everything else
(optimiser, schedule, NaN detection, per-epoch averages, progress callback) lives here once.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

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

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.amp == torch.float16


@dataclass(frozen=True)
class Precision:
    amp: torch.dtype | None      # the autocast dtype, None for fp32
    scaler: bool                 # train with torch.amp.GradScaler (fp16 only)


def choose_precision(device_type: str, capability: tuple[int, int] | None, cpu_fast_bf16: bool,
                     amp: bool | None = None) -> Precision:
    """The mixed precision for a device, as a pure function (testable without a GPU).

    ``capability``: the CUDA compute capability (None off CUDA). ``amp``: the override (the
    ``amp`` argument or ``SWEEP_AMP``); False keeps fp32, True asks for mixed precision even on
    CPUs whose bf16 is slow. ``torch.cuda.is_bf16_supported()`` is no guide: it is also true
    on pre-Ampere GPUs, which emulate bf16 slowly.
    """
    if amp is False:
        return Precision(None, False)
    if device_type == "cuda":
        if capability is not None and tuple(capability) >= (8, 0):
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    use = cpu_fast_bf16 if amp is None else amp
    return Precision(torch.bfloat16 if use else None, False)


def choose_device(requested: str | None, cuda_available: bool, ray_gpus: list | None) -> str:
    """``requested`` (an argument or ``SWEEP_DEVICE``) wins; otherwise CUDA when present, except
    inside a Ray worker granted no GPU (``ray_gpus`` is None outside Ray)."""
    if requested:
        return requested
    if ray_gpus is not None and not ray_gpus:
        return "cpu"
    return "cuda" if cuda_available else "cpu"


def _ray_gpus() -> list | None:
    """The GPUs Ray granted this task or actor; None outside a Ray worker (also in a driver,
    where ``ray.get_gpu_ids()`` is always empty)."""
    ray = sys.modules.get("ray")       # a Ray worker has imported ray; no import cost elsewhere
    if ray is None or not ray.is_initialized():
        return None
    try:
        if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None
        return list(ray.get_gpu_ids())
    except Exception:   # an unexpected Ray version: keep the outside-Ray rule
        return None


def _cuda_capability(dev: torch.device) -> tuple[int, int] | None:
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(dev)


def _amp_override(amp: bool | None) -> bool | None:
    if amp is None and os.environ.get("SWEEP_AMP") in ("0", "1"):
        return os.environ["SWEEP_AMP"] == "1"
    return amp


def pick_runtime(device: str | None = None, amp: bool | None = None) -> Runtime:
    """The fastest sensible runtime (``choose_device`` and ``choose_precision``).

    ``device``/``amp`` override the choice; env ``SWEEP_DEVICE``, ``SWEEP_AMP=0|1`` and
    ``SWEEP_CHANNELS_LAST=0|1`` too.
    """
    requested = device or os.environ.get("SWEEP_DEVICE")
    dev = torch.device(choose_device(requested, torch.cuda.is_available(), None if requested else _ray_gpus()))
    fast_cpu = dev.type != "cuda" and _cpu_has_fast_bf16()
    precision = choose_precision(dev.type, _cuda_capability(dev), fast_cpu, _amp_override(amp))
    # channels-last is faster on every device measured (docs/measurements.md)
    channels_last = os.environ.get("SWEEP_CHANNELS_LAST", "1") != "0"
    return Runtime(device=dev, amp=precision.amp, channels_last=channels_last)


def autocast(rt: Runtime):
    if rt.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp)


def grad_scaler(rt: Runtime) -> "torch.amp.GradScaler":
    """Loss scaling for fp16 runtimes; a disabled scaler (plain backward and step) otherwise.

    ``train`` uses it; its tests run fp16 autocast on the CPU, and no pre-Ampere GPU (where fp16
    is picked) has run them. Loops of their own (DLP's FixMatch stage, the trigger and PGD
    optimisations of TrojanNN, CLA and CheatKD) call ``autocast`` without a scaler yet.
    """
    return torch.amp.GradScaler(rt.device.type, enabled=rt.needs_scaler)


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
    """SGD with momentum, a per-epoch schedule and how the data is fed. The defaults are the
    ``standard`` recipe of ``trainables.recipes`` (our choice, the usual CIFAR setting): lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, 100 epochs, cosine decay, random crop + flip,
    shuffled batches. ``trainables.recipes`` names the others (``reference``: NAD's and ARGD's).

    augment: random crop (4-pixel padding) + horizontal flip on every batch.
    shuffle: a new seeded batch order every epoch; off, one seeded order read the same way every
    epoch, as a loader without shuffling reads CIFAR-10's files, whose order is random (a copy
    stored class by class would otherwise give one-class batches).

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
    warmup_epochs: int | None = None       # linear warm-up: epoch e < w runs at (e+1)/(w+1) of the schedule's lr
    augment: bool = True
    shuffle: bool = True

    def __post_init__(self):
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive (or None: no clipping)")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr >= 0:
            raise ValueError(f"bad training budget: epochs={self.epochs} batch_size={self.batch_size} lr={self.lr}")
        if self.schedule not in ("cosine", "constant", "multistep", "piecewise"):
            raise ValueError(f"unknown schedule {self.schedule!r} (cosine, constant, multistep, piecewise)")
        if self.schedule == "piecewise" and len(self.lr_values) != len(self.milestones):
            raise ValueError("piecewise schedule needs one lr value per milestone")

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during 0-based ``epoch``."""
        lr = self._scheduled_lr(epoch)
        w = self.warmup_epochs or 0
        return lr * (epoch + 1) / (w + 1) if epoch < w else lr

    def _scheduled_lr(self, epoch: int) -> float:
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


class StopTraining(Exception):
    """Raised by an ``on_epoch`` hook to end training after that epoch (e.g. DLP's AU once the
    model has unlearnt D'_p); the epoch counts, and ``train`` returns normally."""


def train(model: nn.Module, data: ImageSet, cfg: SGDConfig, rt: Runtime, *, seed: int,
          loss_fn: LossFn = cross_entropy_loss, augment: bool | None = None,
          params: Iterable[torch.nn.Parameter] | None = None,
          on_epoch: EpochHook | None = None, progress: Callable[[str], None] | None = None,
          train_mode: bool = True, checkpoint: EpochCheckpoint | None = None,
          generators: Sequence[torch.Generator] = ()) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` epochs; return the per-epoch history.

    ``loss_fn`` returns the loss to minimise and a dict of terms to average and log.
    ``augment`` (None: ``cfg.augment``) lets a method fix its own augmentation whatever the
    recipe; the batch order follows ``cfg.shuffle``.
    ``on_epoch(epoch, logs)`` runs after every epoch (evaluation, reporting); what it returns is
    merged into that epoch's history entry; it may raise ``StopTraining``. ``params`` restricts
    what the optimiser updates. ``generators``: those the loss draws from (PGD starts, sampled
    curve points), saved with the checkpoint so that a resumed run draws the same numbers.
    ``checkpoint`` (by default the next phase of the run being checkpointed, if any:
    ``trainables.checkpoint``) is offered the loop's whole state after every epoch; when it holds
    one, training goes on from there (or, when that state ended the loop, returns at once): a run
    retried after a lost node continues where it stopped, on the same batches.
    """
    from trainables.checkpoint import next_phase

    checkpoint = checkpoint if checkpoint is not None else next_phase()
    augment = cfg.augment if augment is None else augment
    data = on_device(data, rt)
    gen = generator(rt, seed)
    fixed_order = None if cfg.shuffle else torch.randperm(
        len(data), generator=torch.Generator().manual_seed(int(seed))).to(rt.device)
    trained = list(params) if params is not None else list(model.parameters())
    opt = make_sgd(trained, cfg)
    scaler = grad_scaler(rt)
    history: list[dict] = []
    first, done = 0, False
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        first, done, history = restore_loop(saved, model, trained, opt, scaler, gen, generators)
        if progress is not None:
            progress(f"resuming from the checkpoint after epoch {first}/{cfg.epochs}")
    for epoch in range(first, cfg.epochs):
        if done:
            break
        set_lr(opt, cfg.lr_at(epoch))
        model.train(train_mode)
        stats, start = EpochStats(), time.perf_counter()
        for x, y, idx in batches(data.x, data.y, cfg.batch_size, generator=gen, shuffle=cfg.shuffle,
                                 augment=augment, order=fixed_order):
            with autocast(rt):
                loss, logs = loss_fn(model, _fmt(x, rt), y, idx)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.max_grad_norm is not None:
                scaler.unscale_(opt)       # clip the true gradients, not the scaled ones
                norm = torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]],
                                                      cfg.max_grad_norm)
                # logged: how large the gradients were, and how often the clip acted
                logs = {**logs, "grad_norm": norm, "clipped": (norm > cfg.max_grad_norm).float()}
            scaler.step(opt)               # skips the step when fp16 gradients overflowed
            scaler.update()
            stats.add({"loss": loss, **logs}, len(y))
        logs = epoch_logs(stats, epoch, opt, start)
        if on_epoch is not None:
            try:
                logs.update(on_epoch(epoch + 1, logs) or {})
            except StopTraining:
                done = True
        done = done or epoch + 1 == cfg.epochs
        history.append(logs)
        if checkpoint is not None:
            checkpoint.save(loop_state(epoch + 1, cfg.epochs, done, history, model, trained, opt, scaler, gen,
                                       generators))
        if progress is not None:
            progress(format_epoch(logs, cfg.epochs))
    model.eval()
    return history


class EpochCheckpoint(Protocol):
    """Where ``train`` keeps its state between epochs (a file, an object in the storage); it
    decides which of the states it is offered to keep."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def loop_state(epoch: int, epochs: int, done: bool, history: list[dict], model: nn.Module,
               trained: list[torch.Tensor], opt: torch.optim.Optimizer, scaler, gen: torch.Generator,
               generators: Sequence[torch.Generator] = ()) -> dict:
    """Everything the loop needs to go on after ``epoch`` of ``epochs`` epochs (``done``: the
    loop ended there) exactly as if never stopped: the model's weights and buffers, the trained
    tensors (which need not be the model's), optimiser and scaler, the batch generator, the
    loss's generators and the global RNG; plain tensors and numbers, so
    ``torch.load(weights_only=True)`` reads it."""
    return {"epoch": epoch, "epochs": epochs, "done": done, "history": history, "model": model.state_dict(),
            "trained": [t.detach() for t in trained], "opt": opt.state_dict(), "scaler": scaler.state_dict(),
            "gen": gen.get_state(), "generators": [g.get_state() for g in generators], "rng": torch.get_rng_state()}


def restore_loop(state: dict, model: nn.Module, trained: list[torch.Tensor], opt: torch.optim.Optimizer,
                 scaler, gen: torch.Generator, generators: Sequence[torch.Generator] = ()) -> tuple[int, bool, list[dict]]:
    """Load ``loop_state``'s output back; returns (epochs done, whether the loop had ended,
    history so far)."""
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for t, value in zip(trained, state["trained"], strict=True):
            t.copy_(value)
    opt.load_state_dict(state["opt"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state, gen)
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s.cpu())
    return int(state["epoch"]), bool(state["done"]), list(state["history"])


def restore_rng(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["gen"].cpu())          # a generator's state is a CPU byte tensor
    torch.set_rng_state(state["rng"].cpu())


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
