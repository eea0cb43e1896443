"""The two stages a trial is made of, runnable without Ray (the ``run`` command).

* **Attack stage**: (dataset, model, attack + parameters, training budget, seed) -> a backdoored
  model and everything needed to evaluate it later (trigger tensors, poisoned indices and images,
  BA/ASR/RA, sample PNG), stored in the content-addressed cache under the hash of its spec.
  ``attack="none"`` trains a clean model the same way (TrojanNN, CLA and CheatKD fit on it).
* **Defense stage**: an attack-stage artifact (or a user's own model) + a defense and its
  parameters -> the repaired model, BA/ASR/RA before and after, DER and the per-epoch history.

Both write the standard ``model.pt`` / ``spec.json`` / ``metrics.json`` so that
``trainables.load_model(DIR)`` rebuilds any output.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainables import registry
from trainables.artifacts import ArtifactCache, spec_hash
from trainables.checkpoint import PhaseCheckpoints, bind_log, checkpointing
from trainables.attacks.base import Attack, FitContext, poison_training_set, triggered_test_set
from trainables.data import check_dataset_name, load_dataset
from trainables.data.base import DataError
from trainables.data.base import Dataset, ImageSet
from trainables.data.splits import clean_subset
from trainables.defenses.base import DefenseContext
from trainables.engine import Runtime, SGDConfig, TrainingDiverged, pick_runtime, prepare, train
from trainables.metrics import backdoor_metrics, der
from trainables.models import build_model, list_models
from trainables.params import ParamError, as_dict, frozen, make_params
from trainables.recipes import expand_recipe
from trainables.storage import open_storage
from trainables.rundir import (CheckpointError, load_model, load_model_file, load_state_dict,
                               model_spec, read_json, write_run_dir)
from trainables.version import code_version

STANDARD_FILES = ("model.pt", "spec.json", "metrics.json")
_KEYED_WHEN_OFF = ("augment", "shuffle")
# a twin stage's seed: far from the sweep's own stages (s + i·1,000,000) and from any seed a user
# replicates at, so a twin is never a stage that is defended or held out
TWIN_SEED_OFFSET = 500_000


# ============================================================================ specs

@dataclass(frozen=True)
class AttackStageSpec:
    """Everything that determines an attack stage's result; its hash names the cache entry."""

    dataset: str
    model: str
    attack: str                      # a registered attack, or "none" for a clean model
    attack_params: dict              # complete (defaults filled in), JSON-able
    train: dict                      # complete SGDConfig fields
    seed: int = 0

    def key(self) -> dict:
        # optional training features that are off (None), and the data feeding at its default
        # (crop + flip, shuffled), stay out of the key: a key names what departs from the loop
        key = {"stage": "attack", **dataclasses.asdict(self)}
        key["train"] = {k: v for k, v in self.train.items()
                        if v is not None and not (k in _KEYED_WHEN_OFF and v is True)}
        return key

    def hash(self) -> str:
        return spec_hash(self.key())

    def clean(self) -> "AttackStageSpec":
        """The clean-model stage with the same data, model, budget and seed."""
        return dataclasses.replace(self, attack="none", attack_params={})

    def twin(self) -> "AttackStageSpec":
        """The same stage trained again from another seed (initialisation and batch order; the
        poisoned set is the attack's own draw): a second backdoored model, as MCR's authors
        trained their two curve endpoints."""
        return dataclasses.replace(self, seed=self.seed + TWIN_SEED_OFFSET)

    @classmethod
    def of_artifact(cls, spec_json: dict) -> "AttackStageSpec | None":
        """The spec an attack-stage artifact was trained from (its ``spec.json``), or None for
        anything else (an external model, a defended model)."""
        if spec_json.get("stage") != "attack":
            return None
        attack = spec_json.get("attack") or {"name": "none", "params": {}}
        spec = cls(spec_json["dataset"], spec_json["model"]["name"], attack["name"], attack.get("params", {}),
                   spec_json["train"], int(spec_json["seed"]))
        return spec if spec.hash() == spec_json.get("hash") else None

    @property
    def sgd(self) -> SGDConfig:
        return SGDConfig(**{k: frozen(v) for k, v in self.train.items()})


@dataclass(frozen=True)
class DefenseStageSpec:
    defense: str
    params: dict                     # complete, JSON-able
    clean_fraction: float = 0.05
    seed: int = 0


def _check_dataset_name(name: str) -> None:
    try:
        check_dataset_name(name)
    except DataError as e:
        raise ParamError(f"dataset: {e}") from None


def _check_model_name(name: str) -> None:
    if name not in list_models() and not _is_wrn(name):
        raise ParamError(f"unknown model {name!r}; known: {', '.join(list_models())}")


def _is_wrn(name: str) -> bool:
    parts = name.split("-")
    return (len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit()
            and int(parts[1]) >= 10 and (int(parts[1]) - 4) % 6 == 0 and int(parts[2]) >= 1)


def resolve_attack_stage(dataset: str, model: str, attack: str, attack_params: dict | None = None,
                         train: dict | None = None, seed: int = 0) -> AttackStageSpec:
    """Validate names and parameters (one clear ``ParamError`` naming the bad key) and fill in
    every default, so equal experiments get equal hashes."""
    _check_dataset_name(dataset)
    _check_model_name(model)
    if attack == "none":
        if attack_params:
            raise ParamError(f"attack.{next(iter(attack_params))}: a clean model (attack none) takes no attack parameters")
        params = {}
    else:
        try:
            cls = registry.get_attack(attack)
        except KeyError as e:
            raise ParamError(str(e.args[0])) from None
        params = as_dict(make_params(cls.Params, attack_params, where=f"attack.{attack}: "))
    sgd = make_params(SGDConfig, expand_recipe(train or {}, where="train"), where="train: ")
    return AttackStageSpec(dataset, model, attack, params, as_dict(sgd), int(seed))


def resolve_defense(defense: str, params: dict | None = None, clean_fraction: float = 0.05,
                    seed: int = 0) -> DefenseStageSpec:
    try:
        cls = registry.get_defense(defense)
    except KeyError as e:
        raise ParamError(str(e.args[0])) from None
    if not 0 < float(clean_fraction) <= 1:
        raise ParamError(f"defense.clean_fraction={clean_fraction} must be in (0, 1]")
    resolved = as_dict(make_params(cls.Params, params, where=f"defense.{defense}: "))
    return DefenseStageSpec(defense, resolved, float(clean_fraction), int(seed))


# ============================================================================ shared pieces

class Evaluator:
    """BA/ASR/RA of a model on the test set (or a fixed seeded subset of it, for per-epoch logs)."""

    def __init__(self, dataset: Dataset, triggered: ImageSet | None, target: int | None, rt: Runtime,
                 subset: int | None = None, seed: int = 0):
        test = dataset.test
        if subset is not None and subset < len(test):
            pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:subset].sort().values
            test = test.subset(pick)
            if triggered is not None:
                # a seeded random draw too: the triggered set is in class order, so its first rows
                # would measure the ASR on one or two classes only
                n = min(len(triggered), max(1, round(subset * len(triggered) / len(dataset.test))))
                rows = torch.randperm(len(triggered), generator=torch.Generator().manual_seed(seed + 1))[:n]
                triggered = triggered.subset(rows.sort().values)
        self.test, self.triggered, self.target, self.rt = test, triggered, target, rt

    def __call__(self, model) -> dict:
        return backdoor_metrics(model, self.test, self.triggered, self.target, self.rt)


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k.upper()}={100 * v:.2f}%" for k, v in m.items() if k in ("ba", "asr", "ra") and v is not None)


def _samples_png(clean_u8: torch.Tensor, poisoned_u8: torch.Tensor, n: int = 8) -> bytes:
    """Two rows: clean training images above their poisoned versions."""
    from PIL import Image
    from torchvision.utils import make_grid

    n = min(n, len(clean_u8))
    grid = make_grid(torch.cat([clean_u8[:n], poisoned_u8[:n]]), nrow=n, padding=2, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _seeded_model(name: str, dataset: Dataset, seed: int):
    torch.manual_seed(seed)
    return build_model(name, dataset.num_classes, mean=dataset.mean, std=dataset.std)


def _progress_prefix(progress: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda msg: progress(f"[{prefix}] {msg}")


# ============================================================================ attack stage

def stage_model(spec: AttackStageSpec, cache, data_root, rt: Runtime, progress: Callable[[str], None],
                epoch_eval_size: int, checkpoint_every: int = 1) -> nn.Module:
    """The model of another stage another one needs (a clean model to fit on, a twin), from the
    cache or trained into it."""
    return prepare(load_model(run_attack_stage(spec, cache, data_root=data_root, rt=rt, progress=progress,
                                               epoch_eval_size=epoch_eval_size,
                                               checkpoint_every=checkpoint_every)), rt)


def run_attack_stage(spec: AttackStageSpec, cache: str | Path | ArtifactCache, *, data_root: str | None = None,
                     rt: Runtime | None = None, progress: Callable[[str], None] = print,
                     epoch_eval_size: int = 2000, checkpoint_every: int = 1) -> Path:
    """The cached artifact directory for ``spec`` (a folder, or an ``ArtifactCache`` that also
    publishes to a sweep's storage), training it first if it is not cached. Training saves its
    state every ``checkpoint_every`` epochs beside the cache (``trainables.checkpoint``) and a
    retried build, on any node that sees the cache, goes on from there."""
    rt = rt or pick_runtime()
    cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)
    key = spec.hash()
    label = f"attack {spec.attack} {spec.model} {spec.dataset} {key[:8]}"
    hit = cache.lookup(key)
    if hit is not None:
        progress(f"[{label}] cached: {hit}")
        return hit
    checkpoints = stage_checkpoints(cache, key, checkpoint_every)

    def build(tmp: Path) -> None:
        with checkpointing(checkpoints):
            build_attack_stage(spec, tmp, cache, data_root, rt, _progress_prefix(progress, label), epoch_eval_size,
                                checkpoint_every)

    path, _ = cache.get_or_build(key, build, progress)
    checkpoints.clear()         # the entry is complete: its training state is not needed again
    return path


def stage_checkpoints(cache: ArtifactCache, key: str, every: int) -> PhaseCheckpoints:
    """Where the attack stage ``key`` keeps its training state: beside the cache, in the sweep's
    storage when there is one (so a retry on another node finds it)."""
    if cache.remote is not None:
        return PhaseCheckpoints(cache.remote, f"{cache.prefix}/.checkpoints/{key}", every)
    return PhaseCheckpoints(open_storage(str(cache.root)), f".checkpoints/{key}", every)


def build_attack_stage(spec: AttackStageSpec, out: Path, cache: str | Path | ArtifactCache, data_root, rt: Runtime,
                       progress: Callable[[str], None], epoch_eval_size: int, checkpoint_every: int = 1) -> None:
    """Train the stage ``spec`` and write its files into ``out`` (``run_attack_stage`` does this
    inside the cache; ``python -m sweep train`` writes a clean model where it is asked to)."""
    start = time.perf_counter()
    dataset = load_dataset(spec.dataset, root=data_root)
    cfg = spec.sgd
    attack: Attack | None = None
    index = torch.zeros(0, dtype=torch.long)
    train_set, triggered, extra = dataset.train, None, {}
    # TrojanNN, CLA and CheatKD fit on a clean model of the same data/model/budget: its own
    # cached stage, so every attack (and every sweep) that needs it shares one training run
    ctx = FitContext(rt=rt, dataset=dataset, seed=spec.seed, progress=progress,
                     clean_model=lambda: stage_model(spec.clean(), cache, data_root, rt, progress, epoch_eval_size,
                                                     checkpoint_every))
    if spec.attack != "none":
        cls = registry.get_attack(spec.attack)
        attack = cls(make_params(cls.Params, spec.attack_params), dataset)
        index = attack.select(dataset.train.y)
        progress(f"fitting the attack ({len(index)} poisoned training images)")
        attack.fit(ctx, dataset.train, index)
        train_set, poisoned_x = poison_training_set(attack, dataset.train, index)
        triggered = triggered_test_set(attack, dataset.test)
        extra = {"attack_state.pt": attack.state_dict(),
                 "poison.pt": {"index": index, "x": poisoned_x},
                 "samples.png": _samples_png(dataset.train.x[index[:8]], poisoned_x[:8])}
    target = attack.params.target if attack else None
    model = prepare(_seeded_model(spec.model, dataset, spec.seed), rt)
    initial = attack.initial_model(ctx) if attack is not None else None
    if initial is not None:
        progress("training starts from the attack's initial model (CheatKD: the clean model)")
        model.load_state_dict(initial.state_dict())
    if attack is not None:
        cfg = attack.training_config(cfg)      # the stage's own budget but for CheatKD's teacher_lr
    per_epoch = Evaluator(dataset, triggered, target, rt, subset=epoch_eval_size, seed=spec.seed)
    progress(f"training {spec.model} on {len(train_set)} images for {cfg.epochs} epochs ({rt.description})")
    history = train(model, train_set, cfg, rt, seed=spec.seed, on_epoch=lambda e, logs: per_epoch(model),
                    progress=progress)
    final = Evaluator(dataset, triggered, target, rt)(model)
    progress(f"done: {_fmt_metrics(final)}")
    mspec = model_spec(spec.model, dataset.num_classes, dataset.mean, dataset.std)
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {**final, "train_seconds": train_seconds,
               "images_per_second": len(train_set) * len(history) / train_seconds if history else None,
               "n_poisoned": len(index), "history": history}
    if attack is not None:
        post = attack.post_train(ctx, model, mspec, dataset.train, Evaluator(dataset, triggered, target, rt))
        if post is not None:
            metrics.update(post.metrics)
            for name, (sub_model, sub_spec) in post.models.items():
                write_run_dir(out / name, sub_model, {"stage": f"attack:{name}", "dataset": spec.dataset,
                                                      "model": sub_spec, "attack": spec.attack}, post.metrics)
                for f in STANDARD_FILES:   # flatten into the entry so the manifest covers them
                    shutil.move(str(out / name / f), out / f"{name}.{f}")
                shutil.rmtree(out / name)
    metrics["seconds"] = time.perf_counter() - start
    spec_json = {"stage": "attack", "hash": spec.hash(), "dataset": spec.dataset,
                 "num_classes": dataset.num_classes, "model": mspec,
                 "attack": {"name": spec.attack, "params": spec.attack_params, "kind": attack.kind if attack else None},
                 "target": target, "train": spec.train, "seed": spec.seed,
                 "poison_index_file": "poison.pt" if attack else None, "code_version": code_version()}
    write_run_dir(out, model, spec_json, metrics, extra)


@dataclass
class AttackArtifact:
    path: Path
    spec: dict
    metrics: dict
    dataset: Dataset
    model: torch.nn.Module
    attack: Attack | None
    poison_index: torch.Tensor
    poisoned_x: torch.Tensor | None

    @property
    def target(self) -> int | None:
        return self.attack.params.target if self.attack else None

    def poisoned_train(self) -> ImageSet:
        """The poisoned training set exactly as the attack stage trained on it."""
        train = self.dataset.train
        if self.attack is None:
            return train
        x, y = train.x.clone(), train.y.clone()
        x[self.poison_index] = self.poisoned_x
        if self.attack.kind != "clean-label":
            y[self.poison_index] = self.attack.params.target
        return ImageSet(x, y)


def load_attack_artifact(path: str | Path, *, data_root: str | None = None,
                         dataset: Dataset | None = None) -> AttackArtifact:
    """Load a cached attack-stage directory (weights_only loads; nothing is unpickled)."""
    path = Path(path)
    spec = read_json(path / "spec.json", "attack-stage spec")
    metrics = read_json(path / "metrics.json", "attack-stage metrics")
    dataset = dataset or load_dataset(spec["dataset"], root=data_root)
    model = load_model(path)
    attack, index, poisoned_x = None, torch.zeros(0, dtype=torch.long), None
    name = spec.get("attack", {}).get("name", "none")
    if name != "none":
        cls = registry.get_attack(name)
        attack = cls(make_params(cls.Params, spec["attack"]["params"]), dataset)
        attack.load_state_dict(load_state_dict(path / "attack_state.pt"))
        poison = load_state_dict(path / "poison.pt")
        index, poisoned_x = poison["index"], poison["x"]
    return AttackArtifact(path, spec, metrics, dataset, model, attack, index, poisoned_x)


# ============================================================================ defense stage

def run_defense_stage(artifact_dir: str | Path, dspec: DefenseStageSpec, out_dir: str | Path | None, *,
                      data_root: str | None = None, rt: Runtime | None = None,
                      report: Callable[[dict], None] | None = None, progress: Callable[[str], None] = print,
                      epoch_eval_size: int = 2000, cache: str | Path | ArtifactCache | None = None) -> dict:
    """Apply a defense to an attack-stage artifact; write the standard files into ``out_dir``.

    ``cache`` holds (or receives) the stage's twin (``AttackStageSpec.twin``) for a defense that
    asks for it; by default the cache the artifact is an entry of."""
    art = load_attack_artifact(artifact_dir, data_root=data_root)
    rt = rt or pick_runtime()
    return defend(art, dspec, out_dir, rt=rt, report=report, progress=progress, epoch_eval_size=epoch_eval_size,
                  twin=_twin_loader(art, cache, data_root, rt, progress, epoch_eval_size))


def _twin_loader(art: AttackArtifact, cache, data_root, rt: Runtime, progress: Callable[[str], None],
                 epoch_eval_size: int) -> Callable[[], nn.Module] | None:
    """A loader of ``art``'s twin stage (trained into the cache on first use), or None where
    ``art`` is no cached attack stage."""
    spec = AttackStageSpec.of_artifact(art.spec)
    if spec is None:
        return None
    if cache is None:
        cache = ArtifactCache(art.path.parent)
        if cache.lookup(spec.hash()) is None:      # not a cache entry: never write beside it
            return None
    twin = spec.twin()

    def load() -> nn.Module:
        progress(f"twin stage {twin.attack} seed {twin.seed} ({twin.hash()[:8]})")
        return stage_model(twin, cache, data_root, rt, progress, epoch_eval_size)
    return load


def load_external(model_file: str | Path, spec_file: str | Path, *, attack: str | None = None,
                  attack_params: dict | None = None, data_root: str | None = None,
                  rt: Runtime | None = None, progress: Callable[[str], None] = print) -> AttackArtifact:
    """A user's own (suspicious) model as an artifact. With ``attack`` the trigger is built (and
    fitted if the attack needs it, on the suspicious model itself) so that ASR can be measured."""
    spec = read_json(spec_file, "model spec")
    if "dataset" not in spec:
        raise CheckpointError(f"{spec_file} must name the 'dataset' the model was trained on")
    dataset = load_dataset(spec["dataset"], root=data_root)
    model = load_model_file(model_file, spec_file)
    if model.num_classes != dataset.num_classes:
        raise CheckpointError(f"{model_file}: {model.num_classes} outputs but {spec['dataset']} has {dataset.num_classes} classes")
    atk = None
    if attack:
        cls = registry.get_attack(attack)
        atk = cls(make_params(cls.Params, attack_params, where=f"attack.{attack}: "), dataset)
        rt = rt or pick_runtime()
        ctx = FitContext(rt=rt, dataset=dataset, seed=0, progress=progress, clean_model=lambda: prepare(model, rt))
        atk.fit(ctx, dataset.train, atk.select(dataset.train.y))
    spec = {**spec, "stage": "external", "attack": {"name": attack or "unknown", "params": as_dict(atk.params) if atk else {}}}
    return AttackArtifact(Path(model_file), spec, {}, dataset, model, atk, torch.zeros(0, dtype=torch.long), None)


def defend(art: AttackArtifact, dspec: DefenseStageSpec, out_dir: str | Path | None, *,
           rt: Runtime | None = None, report: Callable[[dict], None] | None = None,
           progress: Callable[[str], None] = print, epoch_eval_size: int = 2000,
           twin: Callable[[], nn.Module] | None = None) -> dict:
    rt = rt or pick_runtime()
    start = time.perf_counter()
    cls = registry.get_defense(dspec.defense)
    defense = cls(make_params(cls.Params, dspec.params, where=f"defense.{dspec.defense}: "))
    label = _progress_prefix(progress, f"defense {dspec.defense}")
    dataset, attack = art.dataset, art.attack
    triggered = triggered_test_set(attack, dataset.test) if attack else None
    full = Evaluator(dataset, triggered, art.target, rt)
    per_epoch = Evaluator(dataset, triggered, art.target, rt, subset=epoch_eval_size, seed=dspec.seed)
    model = prepare(art.model, rt)
    before = full(model)
    label(f"before: {_fmt_metrics(before)}")
    poison_set = set(art.poison_index.tolist())

    def score_filter(index: torch.Tensor) -> dict:
        found = set(index.tolist())
        hits = len(found & poison_set)
        return {"precision": hits / max(1, len(found)), "recall": hits / max(1, len(poison_set)), "n_flagged": len(found)}

    gen = torch.Generator().manual_seed(dspec.seed)
    ctx = DefenseContext(rt=rt, seed=dspec.seed, num_classes=dataset.num_classes, evaluate=per_epoch,
                         score_filter=score_filter, report=report or (lambda e: None), progress=label,
                         oracle_trigger=(lambda x: attack.apply(x, gen)) if attack else None,
                         twin_model=twin)
    bind_log(ctx.history)       # a retried trial's log as of its last checkpoint comes back here
    mname = art.spec["model"]["name"]
    ctx.build_model = lambda name=None: prepare(_seeded_model(name or mname, dataset, dspec.seed), rt)
    if cls.kind == "post-training":
        # the clean subset comes from the clean training images, never from poisoned ones
        pick = clean_subset(dataset.train.y, dspec.clean_fraction, dspec.seed, exclude=art.poison_index)
        ctx.model, ctx.clean = model, dataset.train.subset(pick)
        label(f"clean subset: {len(pick)} images ({100 * dspec.clean_fraction:g}% of the training set)")
    else:
        if art.poisoned_x is None and attack is not None or art.spec.get("stage") == "external":
            raise ParamError(f"defense {dspec.defense} trains from the poisoned training set; it needs an attack-stage artifact, not a model file")
        ctx.train = art.poisoned_train()
    try:
        repaired = defense.run(ctx)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"defense {dspec.defense} diverged: {e} (try a lower lr, or max_grad_norm "
                               f"where the defense has it)") from None
    after = full(repaired)
    label(f"after: {_fmt_metrics(after)}")
    metrics = {**after, "before": before, "after": after,
               "der": der(before, after) if "asr" in before else None,
               "history": ctx.history, "seconds": time.perf_counter() - start,
               "clean_subset_size": len(ctx.clean) if ctx.clean is not None else None}
    if out_dir is not None:
        spec_json = {**{k: v for k, v in art.spec.items() if k not in ("hash", "code_version", "stage")},
                     "model": {**art.spec["model"], "name": ctx.output_model or mname},
                     "stage": "defense", "attack_hash": art.spec.get("hash"),
                     "defense": {"name": dspec.defense, "params": dspec.params, "kind": cls.kind,
                                 "clean_fraction": dspec.clean_fraction, "seed": dspec.seed},
                     "code_version": code_version()}
        write_run_dir(out_dir, repaired, spec_json, metrics)
    return metrics


def export_artifact(artifact_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a cached attack-stage artifact's files into a user's output directory."""
    src, out = Path(artifact_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    return out
