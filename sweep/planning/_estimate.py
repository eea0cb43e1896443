"""``--dry-run``: the resolved config, the plan (attack stages, Tuners, trials) and a cost estimate.

How the cost is computed (a rough, stated model, not a measurement):

* **Images processed** counts training passes (forward + backward) of one 32x32 image. Each
  method states its own count (``Attack.extra_passes``, ``Defense.cost``): an attack stage is
  ``n_train x epochs`` plus what the attack adds (e.g. CheatKD's distillation), and its clean
  model's, counted once per distinct clean model; a defense trial is what the defense's ``cost``
  says for its parameters and its training images (the clean subset ``clean_fraction x n_train``
  for a post-training defense, the whole poisoned training set for a training-time one).
  Searched parameters count at their paper default. With ``search.stages: K`` every attack has
  K stages and every trial defends each of them (K times a one-stage trial); what early stopping
  on stages would save is shown beside, not subtracted (``expected_stages``). Per-epoch evaluation (``epoch_eval_size``
  clean + triggered test images per logged epoch) and the final evaluation are forward-only and
  count 1/3 each.
* **Compute** = images x 3 x the model's forward FLOPs (counted by ``torch.utils.flop_counter``
  on one image).
* **Time** at assumed sustained throughputs: 40 GFLOP/s per CPU core (fp32; WRN-16-1 trains at
  ~600 img/s on two cores of the development machine) and 5 TFLOP/s per GPU (an assumption, not
  measured here: bf16 on a data-centre GPU, where small models like WRN-16-1 are bound by kernel
  launches rather than arithmetic, which is also why trials take fractions of one GPU).
"""
from __future__ import annotations

import functools

import os
from dataclasses import dataclass
from pathlib import Path

from sweep.config import SweepConfig, format_config
from sweep.planning._plan import Plan, make_plan, tuner_plans
from trainables.params import make_params

CPU_FLOPS_PER_CORE = 40e9
GPU_FLOPS = 5e12


def dataset_sizes(name: str) -> tuple[int, int] | None:
    kind, _, arg = name.partition(":")
    if kind == "synthetic":
        parts = arg.split(":") if arg else []
        n_train = int(parts[0]) if parts else 3000
        n_test = int(parts[1]) if len(parts) > 1 else 1000
        return n_train, n_test
    if kind == "imagefolder" and arg:
        return _imagefolder_sizes(arg)
    return {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "gtsrb": (26640, 12630)}.get(kind)


@functools.lru_cache(maxsize=8)
def _imagefolder_sizes(path: str) -> tuple[int, int] | None:
    """Its train and test image counts (the files are listed, not read); None if it cannot be read."""
    from trainables.data import DataError
    from trainables.data.imagefolder import scan

    try:
        _, _, files = scan(path)
    except DataError:
        return None
    return len(files["train"]), len(files["test"])


def forward_flops(model: str, num_classes: int = 10) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.models import build_model

    m = build_model(model, num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, 3, 32, 32))
    return float(fc.get_total_flops())


@dataclass
class Images:
    """Training passes and forward-only evaluation images, split by where they are spent."""

    stages: float = 0.0
    trials: float = 0.0
    evals: float = 0.0
    unknown: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.stages + self.trials + self.evals / 3


def count_images(cfg: SweepConfig, plan: Plan) -> Images:
    from trainables import registry

    out, unknown = Images(), []
    for s in plan.stages:
        sizes = dataset_sizes(s.spec.dataset)
        if sizes is None:
            unknown.append(s.spec.dataset)
            continue
        n_train, n_test = sizes
        epochs = s.spec.train["epochs"]
        extra = 0.0
        if s.attack != "none":
            cls = registry.get_attack(s.attack)
            extra = cls.extra_passes(make_params(cls.Params, s.spec.attack_params), n_train)
        out.stages += n_train * epochs + extra
        out.evals += epochs * 2 * min(cfg.epoch_eval_size, n_test) + 2 * n_test
    for p in plan.pairs:
        sizes = dataset_sizes(cfg.attack(p.attack).dataset)
        if sizes is None:
            unknown.append(cfg.attack(p.attack).dataset)
            continue
        n_train, n_test = sizes
        if cfg.kind == "attack":       # each trial trains its own attack stage
            cls = registry.get_attack(p.attack)
            per = n_train * cfg.attack(p.attack).train_dict.get("epochs", 100) \
                + cls.extra_passes(make_params(cls.Params, p.first_trial()), n_train)
            out.trials += per * p.num_samples
            out.evals += p.num_samples * 4 * n_test
            continue
        cost = _defense_cost(cfg, p, n_train)
        k = cfg.search.stages                   # every trial defends each of the attack's stages
        out.trials += cost.passes * p.num_samples * k
        out.evals += (cost.logged_epochs * 2 * min(cfg.epoch_eval_size, n_test) + 4 * n_test) * p.num_samples * k
    out.unknown = tuple(sorted(set(unknown)))
    return out


def _defense_cost(cfg: SweepConfig, pair, n_train: int):
    from trainables import registry

    cls = registry.get_defense(pair.defense)
    n = n_train if cls.kind == "training-time" else int(cfg.clean_fraction * n_train)
    return cls.cost(make_params(cls.Params, pair.first_trial()), n)


def trial_images(cfg: SweepConfig, pair, sizes: tuple[int, int]) -> float:
    """One defense trial of ``pair`` in images processed (evaluation at 1/3), as ``count_images``
    counts it; attack sweeps: one attack trial."""
    from trainables import registry

    n_train, n_test = sizes
    if cfg.kind == "attack":
        cls = registry.get_attack(pair.attack)
        return n_train * cfg.attack(pair.attack).train_dict.get("epochs", 100) \
            + cls.extra_passes(make_params(cls.Params, pair.first_trial()), n_train) + 4 * n_test / 3
    cost = _defense_cost(cfg, pair, n_train)
    stage = cost.passes + (cost.logged_epochs * 2 * min(cfg.epoch_eval_size, n_test) + 4 * n_test) / 3
    return stage * cfg.search.stages


def expected_stages(stages: int, reduction_factor: int = 2) -> float:
    """The stages a stoppable trial defends on average if ASHA (rungs at 1, 2, 4... stages below
    ``stages``) lets 1/``reduction_factor`` of the trials past each rung: an upper bound on
    what it saves, since asynchronous rungs let early trials past with fewer to compare."""
    rungs = [reduction_factor ** j for j in range(stages) if reduction_factor ** j < stages]
    total, surviving = 1.0, 1.0
    for j, rung in enumerate(rungs):
        surviving /= reduction_factor
        total += ((rungs[j + 1] if j + 1 < len(rungs) else stages) - rung) * surviving
    return total


def _stage_lines(cfg: SweepConfig, plan: Plan) -> list[str]:
    """What several stages per attack cost: the stage trainings, the trials' stages, and what
    early stopping on stages is expected to save."""
    k = cfg.search.stages
    seeds = ", ".join(map(str, cfg.stage_seeds))
    lines = [f"stages per attack: {k} (seeds {seeds}); each trial defends all {k}: its cost x{k}"]
    stoppable = sum(p.num_samples - 1 for p in plan.pairs if p.searched)
    trials = sum(p.num_samples for p in plan.pairs)
    if cfg.search.stops_on_stages and stoppable:
        mean = expected_stages(k)
        saved = stoppable * (k - mean) / (trials * k)
        lines.append(f"early stopping on stages (ASHA, rungs at {', '.join(str(2 ** j) for j in range(k) if 2 ** j < k)} "
                     f"stage(s), half of the trials past each): a searched trial other than the paper default "
                     f"defends ~{mean:.2f} of {k} stages; expected saving: up to {100 * saved:.0f}% of the "
                     f"trials' {trials * k} trial-stages (the paper defaults and cross-checks defend all {k})")
    return lines


def dry_run(cfg: SweepConfig, workdir: str | Path | None = None) -> str:
    """The resolved config, the plan and the cost estimate; with ``workdir``, which stages are
    cached there."""
    from trainables import registry
    from trainables.artifacts import ArtifactCache

    plan = make_plan(cfg)
    cache = ArtifactCache(Path(workdir).expanduser() / "cache") if workdir else None
    lines = [format_config(cfg).rstrip(), "", "# ---- plan " + "-" * 60]
    lines.append(f"attack stages: {len(plan.stages)} distinct (each trains once, then is cached by its hash)")
    needs_clean = [a.name for a in cfg.attacks
                   if a.name != "none" and getattr(registry.get_attack(a.name), "needs_clean_model", False)]
    for s in plan.stages:
        state = ""
        if cache is not None:
            state = " [cached]" if cache.lookup(s.hash) else " [to train]"
        what = f"clean model ({', '.join(needs_clean)} fit on it)" if s.attack == "none" else s.attack
        if s.twin:
            what += f" twin (seed {s.spec.seed}: MCR's second endpoint)"
        lines.append(f"  {s.hash}  {what} on {s.spec.dataset}, {s.spec.train['epochs']} epochs{state}")
    cross = 0
    if cfg.kind == "defense" and cfg.search.cross_check and len(cfg.attacks) > 1:
        cross = sum(len(cfg.attacks) * (len(cfg.attacks) - 1) for d in cfg.defenses if d.searched)
    tuners = tuner_plans(cfg, plan)
    n_defaults, n_pairs, n_cross = (sum(t.kind == k for t in tuners) for k in ("defaults", "pair", "crosscheck"))
    fixed = [p for t in tuners if t.kind == "defaults" for p in t.pairs]
    parts = ([f"the {len(fixed)} paper-default trial(s) in {n_defaults}, one per attack"] if fixed else []) \
        + ([f"{n_pairs} searched pair(s)"] if n_pairs else []) + ([f"{n_cross} cross-check(s)"] if n_cross else [])
    lines.append(f"Tuners: {n_defaults + n_pairs + n_cross} ({'; '.join(parts)}); trials: {plan.num_trials}"
                 + (f" + at most {cross} cross-check trials" if cross else ""))
    for p in plan.pairs:
        how = (f"{p.num_samples} trials, {cfg.search.sampler} over {len(p.space)} parameters"
               if p.searched else "1 trial at the paper defaults")
        lines.append(f"  {p.key}: {how}")
    if cfg.search.stages > 1:
        lines += _stage_lines(cfg, plan)
    lines += ["", "# ---- cost estimate (see sweep/planning/_estimate.py for the model) " + "-" * 4]
    lines += _cost_lines(cfg, count_images(cfg, plan))
    return "\n".join(lines) + "\n"


def _cost_lines(cfg: SweepConfig, images: Images) -> list[str]:
    flops = forward_flops(cfg.model)
    compute = images.total * 3 * flops
    cpu_h = compute / CPU_FLOPS_PER_CORE / 3600
    gpu_h = compute / GPU_FLOPS / 3600
    lines = ["how: training passes = what each attack stage and trial states for its parameters (searched "
             "parameters at their paper default), evaluation images count 1/3; compute = passes x 3 x the "
             "model's forward FLOPs; time at 40 GFLOP/s per CPU core, 5 TFLOP/s per GPU",
             f"model {cfg.model}: {flops / 1e6:.1f} MFLOP per image forward",
             f"images processed: {_si(images.stages + images.trials)} training passes "
             f"(attack stages {_si(images.stages)}, trials {_si(images.trials)}) + {_si(images.evals)} "
             f"evaluation images (forward only)",
             f"compute: {compute / 1e15:.3g} PFLOP  =  ~{cpu_h:.3g} CPU-core-hours at 40 GFLOP/s per core, "
             f"or ~{gpu_h:.3g} GPU-hours at 5 TFLOP/s"]
    if images.unknown:
        lines.append(f"(not counted: datasets of unknown size {list(images.unknown)})")
    cores = os.cpu_count() or 1
    if cfg.resources.gpus == 0:
        lines.append(f"wall-clock on this machine ({cores} CPUs, trials of {cfg.resources.cpus:g} CPU each): "
                     f"~{cpu_h * 60 / max(1, cores):.3g} minutes if every core is kept busy")
    else:
        per_gpu = max(1, int(1 / cfg.resources.gpus)) if cfg.resources.gpus < 1 else 1
        lines.append(f"wall-clock per GPU ({per_gpu} trial(s) share one at resources.gpus="
                     f"{cfg.resources.gpus:g}): ~{gpu_h * 60:.3g} GPU-minutes in total; divide by the GPUs you have")
    return lines


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
