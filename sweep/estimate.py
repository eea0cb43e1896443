"""``--dry-run``: the resolved config, the plan (attack stages, Tuners, trials) and a cost estimate.

How the cost is computed (a rough, stated model, not a measurement):

* **Images processed** counts training passes (forward + backward) of one 32x32 image.
  An attack stage: ``n_train x epochs`` (+ its clean model's, for the attacks that fit on one,
  counted once per distinct clean model; + CheatKD's ``kd_epochs x n_train`` distillation).
  A defense trial: the images it trains on (the clean subset ``clean_fraction x n_train`` for a
  post-training defense, the whole poisoned training set for a training-time one) times the sum
  of its ``*epochs`` parameters (``iterations x batch_size`` where a defense counts iterations),
  with every PGD step (``pgd_steps``) of the main ``epochs`` counted as one more pass. Searched
  parameters count at their paper default. Per-epoch evaluation (``epoch_eval_size`` clean +
  triggered test images) and the final evaluation are forward-only and count 1/3 each.
  Phases that run on a small part of the data (DLP's unlearning, ABL's unlearning) are counted on
  the whole set, so the estimate errs high for them.
* **Compute** = images x 3 x the model's forward FLOPs (counted by
  ``torch.utils.flop_counter`` on one image).
* **Time** at assumed sustained throughputs: 40 GFLOP/s per CPU core (fp32; WRN-16-1 trains at
  ~600 img/s on two cores of the development machine) and 5 TFLOP/s per GPU (an assumption, not
  measured here: bf16 on a data-centre GPU, where small models like WRN-16-1 are bound by kernel
  launches rather than arithmetic, which is also why trials take fractions of one GPU).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from sweep.config import SweepConfig, format_config
from sweep.plan import make_plan

CPU_FLOPS_PER_CORE = 40e9
GPU_FLOPS = 5e12
_EPOCHS = re.compile(r"(^|_)epochs$")


def dataset_sizes(name: str) -> tuple[int, int] | None:
    kind, _, arg = name.partition(":")
    if kind == "synthetic":
        parts = arg.split(":") if arg else []
        n_train = int(parts[0]) if parts else 3000
        n_test = int(parts[1]) if len(parts) > 1 else 1000
        return n_train, n_test
    return {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "gtsrb": (26640, 12630)}.get(kind)


def forward_flops(model: str, num_classes: int = 10) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.models import build_model

    m = build_model(model, num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, 3, 32, 32))
    return float(fc.get_total_flops())


def _defense_passes(cls, params: dict, base: int, eval_imgs: int, n_test: int) -> tuple[float, float]:
    """(training passes, forward-only evaluation images) of one trial."""
    epochs = sum(v for k, v in params.items() if _EPOCHS.search(k) and isinstance(v, int))
    passes = base * epochs
    if isinstance(params.get("iterations"), int) and isinstance(params.get("batch_size"), int):
        passes += params["iterations"] * params["batch_size"]
    if isinstance(params.get("pgd_steps"), int) and isinstance(params.get("epochs"), int):
        passes += base * params["epochs"] * params["pgd_steps"]
    evals = epochs * 2 * eval_imgs + 4 * n_test
    return passes, evals


def dry_run(cfg: SweepConfig, workdir: str | Path | None = None) -> str:
    from trainables import registry
    from trainables.artifacts import ArtifactCache
    from trainables.tune_trainable import decode

    from sweep.spaces import first_point

    plan = make_plan(cfg)
    cache = ArtifactCache(Path(workdir).expanduser() / "cache") if workdir else None
    lines = [format_config(cfg).rstrip(), "", "# ---- plan " + "-" * 60]
    lines.append(f"attack stages: {len(plan.stages)} distinct (each trains once, then is cached by its hash)")
    for s in plan.stages:
        state = ""
        if cache is not None:
            state = " [cached]" if cache.lookup(s.hash) else " [to train]"
        what = "clean model (TrojanNN/CLA/CheatKD fit on it)" if s.attack == "none" else s.attack
        lines.append(f"  {s.hash}  {what} on {s.spec.dataset}, {s.spec.train['epochs']} epochs{state}")
    cross = 0
    if cfg.kind == "defense" and cfg.search.cross_check and len(cfg.attacks) > 1:
        cross = sum(len(cfg.attacks) * (len(cfg.attacks) - 1) for d in cfg.defenses if d.searched)
    searched = [p for p in plan.pairs if p.searched]
    fixed = [p for p in plan.pairs if not p.searched]
    grouped = cfg.kind == "defense" and fixed
    n_tuners = len(searched) + (1 if grouped else len(fixed))
    lines.append(f"Tuners: {n_tuners}" + (f" (the {len(fixed)} paper-default trial(s) together in one, run in "
                                          f"parallel; then one per searched pair)" if grouped else "")
                 + f"; trials: {plan.num_trials}" + (f" + at most {cross} cross-check trials" if cross else ""))
    for p in plan.pairs:
        how = (f"{p.num_samples} trials, {cfg.search.sampler} over {len(p.space)} parameters"
               if p.searched else "1 trial at the paper defaults")
        lines.append(f"  {p.key}: {how}")

    # ---- cost -------------------------------------------------------------------------------
    lines.append("")
    lines.append("# ---- cost estimate (see sweep/estimate.py for the model) " + "-" * 14)
    lines.append("how: training passes = images x epochs of every attack stage and trial (PGD steps count "
                 "as passes, searched parameters at their paper default), evaluation images count 1/3; "
                 "compute = passes x 3 x the model's forward FLOPs; time at 40 GFLOP/s per CPU core, "
                 "5 TFLOP/s per GPU")
    flops = forward_flops(cfg.model)
    total_passes, total_evals = 0.0, 0.0
    stage_passes, trial_passes = 0.0, 0.0
    unknown = []
    for s in plan.stages:
        sizes = dataset_sizes(s.spec.dataset)
        if sizes is None:
            unknown.append(s.spec.dataset)
            continue
        n_train, n_test = sizes
        ep = s.spec.train["epochs"]
        p = n_train * ep + n_train * int(s.spec.attack_params.get("kd_epochs", 0) or 0)
        e = ep * 2 * min(cfg.epoch_eval_size, n_test) + 2 * n_test
        stage_passes += p
        total_evals += e
    if cfg.kind == "attack":
        for p in plan.pairs:
            a = cfg.attack(p.attack)
            sizes = dataset_sizes(a.dataset)
            if sizes is None:
                unknown.append(a.dataset)
                continue
            n_train, n_test = sizes
            params = {**a.params_dict, **decode(first_point({d.name: d for d in a.space}), None)}
            cls = registry.get_attack(a.name)
            defaults = {f: getattr(cls.Params, f, None) for f in cls.Params.__dataclass_fields__}
            kd = params.get("kd_epochs", defaults.get("kd_epochs")) or 0
            per = n_train * (cfg.attack_train_dict.get("epochs", 100) + int(kd))
            trial_passes += per * p.num_samples
            total_evals += p.num_samples * 4 * n_test
    else:
        for p in plan.pairs:
            stage = plan.stage_for(p.attack)
            sizes = dataset_sizes(stage.spec.dataset)
            if sizes is None:
                unknown.append(stage.spec.dataset)
                continue
            n_train, n_test = sizes
            cls = registry.get_defense(p.defense)
            defaults = {f.name: f.default for f in cls.Params.__dataclass_fields__.values()}
            dists = {d.name: d for d in p.space}
            decoders = {n: d.decoder() for n, d in dists.items() if d.decoder()}
            params = {**defaults, **dict(p.fixed), **decode(first_point(dists), decoders)}
            base = n_train if cls.kind == "training-time" else int(cfg.clean_fraction * n_train)
            tp, te = _defense_passes(cls, params, base, min(cfg.epoch_eval_size, n_test), n_test)
            trial_passes += tp * p.num_samples
            total_evals += te * p.num_samples
    total_passes = stage_passes + trial_passes
    images = total_passes + total_evals / 3
    compute = images * 3 * flops
    cpu_h = compute / CPU_FLOPS_PER_CORE / 3600
    gpu_h = compute / GPU_FLOPS / 3600
    lines.append(f"model {cfg.model}: {flops / 1e6:.1f} MFLOP per image forward")
    lines.append(f"images processed: {_si(total_passes)} training passes "
                 f"(attack stages {_si(stage_passes)}, trials {_si(trial_passes)}) + {_si(total_evals)} "
                 f"evaluation images (forward only)")
    lines.append(f"compute: {compute / 1e15:.3g} PFLOP  =  ~{cpu_h:.3g} CPU-core-hours at 40 GFLOP/s per core, "
                 f"or ~{gpu_h:.3g} GPU-hours at 5 TFLOP/s")
    if unknown:
        lines.append(f"(not counted: datasets of unknown size {sorted(set(unknown))})")
    cores = os.cpu_count() or 1
    if cfg.resources.gpus == 0:
        lines.append(f"wall-clock on this machine ({cores} CPUs, trials of {cfg.resources.cpus:g} CPU each): "
                     f"~{cpu_h * 60 / max(1, cores):.3g} minutes if every core is kept busy")
    else:
        per_gpu = max(1, int(1 / cfg.resources.gpus)) if cfg.resources.gpus < 1 else 1
        lines.append(f"wall-clock per GPU ({per_gpu} trial(s) share one at resources.gpus="
                     f"{cfg.resources.gpus:g}): ~{gpu_h * 60:.3g} GPU-minutes in total; divide by the GPUs you have")
    return "\n".join(lines) + "\n"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
