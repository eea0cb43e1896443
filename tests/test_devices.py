"""Devices and mixed precision (``trainables.engine``): the choice as pure functions, over every
case, without a GPU; the training loop's gradient scaler under fp16 (on the CPU); and, in the
``ray`` tier, a Ray task or actor given no GPU staying on the CPU where a GPU is visible.

What needs a real GPU and is not run here: fp16 and bf16 autocast on CUDA itself, and the speed
claims behind the choice (bf16 native from compute capability 8.0, emulated before).
"""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import pytest
import torch
from torch import nn

from trainables.data.base import ImageSet
from trainables.engine import (Precision, Runtime, SGDConfig, _ray_gpus, choose_device, choose_precision,
                               grad_scaler, pick_runtime, train)

BF16, FP16 = torch.bfloat16, torch.float16


# ============================================================================ the choice

@pytest.mark.parametrize("device, capability, cpu_fast, amp, expected", [
    # GPUs: bf16 where native (Ampere, compute capability 8.0, and later), fp16 + scaler before
    ("cuda", (9, 0), False, None, Precision(BF16, False)),
    ("cuda", (8, 0), False, None, Precision(BF16, False)),
    ("cuda", (8, 6), True, None, Precision(BF16, False)),
    ("cuda", (7, 5), False, None, Precision(FP16, True)),
    ("cuda", (7, 0), True, None, Precision(FP16, True)),     # the CPU's bf16 says nothing of the GPU's
    ("cuda", (6, 1), False, None, Precision(FP16, True)),
    ("cuda", (7, 0), False, True, Precision(FP16, True)),    # SWEEP_AMP=1: mixed precision, the GPU's kind
    ("cuda", (8, 0), False, True, Precision(BF16, False)),
    ("cuda", (8, 0), True, False, Precision(None, False)),   # SWEEP_AMP=0: fp32
    ("cuda", (7, 0), True, False, Precision(None, False)),
    # CPUs: bf16 only with fast oneDNN bf16 kernels, unless overridden
    ("cpu", None, True, None, Precision(BF16, False)),
    ("cpu", None, False, None, Precision(None, False)),
    ("cpu", None, False, True, Precision(BF16, False)),
    ("cpu", None, True, False, Precision(None, False)),
])
def test_precision_follows_the_device_and_the_overrides(device, capability, cpu_fast, amp, expected):
    assert choose_precision(device, capability, cpu_fast, amp) == expected


@pytest.mark.parametrize("requested, cuda, ray_gpus, expected", [
    (None, True, None, "cuda"),          # outside Ray: CUDA when present (as before)
    (None, False, None, "cpu"),
    (None, True, [], "cpu"),             # a Ray task or actor granted no GPU
    (None, True, [0], "cuda"),
    (None, True, ["1"], "cuda"),         # Ray's ids may be strings (CUDA_VISIBLE_DEVICES)
    (None, False, [0], "cpu"),
    ("cuda:1", True, [], "cuda:1"),      # an explicit device (argument or SWEEP_DEVICE) wins
    ("cpu", True, [0], "cpu"),
])
def test_device_follows_what_ray_granted(requested, cuda, ray_gpus, expected):
    assert choose_device(requested, cuda, ray_gpus) == expected


def test_pick_runtime_reads_the_overrides_and_is_outside_ray_here(monkeypatch):
    assert _ray_gpus() is None                        # no Ray worker: the outside-Ray rule
    monkeypatch.setenv("SWEEP_AMP", "0")
    assert pick_runtime("cpu").amp is None
    monkeypatch.setenv("SWEEP_AMP", "1")
    assert pick_runtime("cpu").amp == BF16
    assert pick_runtime("cpu", amp=False).amp is None  # the argument before the variable
    monkeypatch.setenv("SWEEP_DEVICE", "cpu")
    assert pick_runtime().device == torch.device("cpu")


def test_only_fp16_runtimes_get_an_enabled_scaler():
    cpu = torch.device("cpu")
    assert Runtime(cpu, FP16, False).needs_scaler and grad_scaler(Runtime(cpu, FP16, False)).is_enabled()
    for amp in (BF16, None):
        assert not Runtime(cpu, amp, False).needs_scaler
        assert not grad_scaler(Runtime(cpu, amp, False)).is_enabled()


# ============================================================================ the loop's scaler

def _tiny_data(n=32):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 4, (n,), generator=g))


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def _underflowing_loss(model, x, y, idx):
    # a gradient of 1e-8 per logit: below fp16's smallest subnormal (6e-8), so unscaled fp16
    # backward rounds it to zero; the scaler (x65536 at the start) keeps it representable
    out = model(x)
    loss = (out * 1e-8).sum()
    return loss, {}


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_fp16_training_uses_the_gradient_scaler(max_grad_norm):
    """fp16 autocast runs on the CPU too (slowly), so the loop's scaler is checked here: without
    it every update of this loss underflows to zero and the weights never move."""
    model = _tiny_model()
    before = model[1].weight.detach().clone()
    rt = Runtime(torch.device("cpu"), FP16, channels_last=False)
    cfg = SGDConfig(epochs=1, lr=1e3, batch_size=16, momentum=0.0, weight_decay=0.0, schedule="constant",
                    max_grad_norm=max_grad_norm)
    history = train(model, _tiny_data(), cfg, rt, seed=0, loss_fn=_underflowing_loss, augment=False)
    assert len(history) == 1
    assert not torch.equal(model[1].weight.detach(), before)
    assert torch.isfinite(model[1].weight).all()


def test_fp32_training_is_unchanged_by_the_disabled_scaler():
    """The default path: same seed, same weights as a plain backward/step loop."""
    data, rt = _tiny_data(), Runtime(torch.device("cpu"), None, channels_last=False)
    cfg = SGDConfig(epochs=1, lr=0.1, batch_size=16, schedule="constant")
    model = _tiny_model()
    train(model, data, cfg, rt, seed=0, augment=False)

    from trainables.data.loader import batches
    from trainables.engine import cross_entropy_loss, generator, make_sgd

    ref = _tiny_model()
    opt = make_sgd(ref.parameters(), cfg)
    for x, y, idx in batches(data.x, data.y, cfg.batch_size, generator=generator(rt, 0), shuffle=True, augment=False):
        loss, _ = cross_entropy_loss(ref, x, y, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert torch.equal(model[1].weight, ref[1].weight)


# ============================================================================ inside Ray

@pytest.mark.ray
def test_a_ray_task_given_no_gpu_runs_on_the_cpu_where_a_gpu_is_visible():
    """A local Ray that advertises one (pretend) GPU; in its tasks torch is told a CUDA device of
    compute capability 7.0 is visible. A task granted no GPU must pick the CPU; one granted the
    GPU picks CUDA with fp16 and a scaler. No CUDA call is made, so no GPU is needed."""
    import ray

    from sweep.execution import _compat as compat

    def probe():
        import torch

        from trainables.engine import _ray_gpus, pick_runtime

        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_capability = lambda device=None: (7, 0)
        rt = pick_runtime()
        return _ray_gpus(), rt.device.type, str(rt.amp), rt.needs_scaler

    compat.keep_local_ray_on_loopback()
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False,
             object_store_memory=80 * 2 ** 20, configure_logging=False)
    try:
        assert _ray_gpus() is None                    # the driver is no worker
        task = ray.remote(probe)
        no_gpu = ray.get(task.options(num_cpus=1, num_gpus=0).remote())
        with_gpu = ray.get(task.options(num_cpus=1, num_gpus=1).remote())
    finally:
        ray.shutdown()
    assert no_gpu[:2] == ([], "cpu") and not no_gpu[3]     # the CPU's precision (bf16 or fp32)
    assert with_gpu[1:] == ("cuda", "torch.float16", True) and len(with_gpu[0]) == 1
