"""``sweeps/<sweep_id>/sweep.json``: a sweep's state on disk, what ``--resume`` and ``report`` read.

It holds the normalised config (and its hash), the overrides, the MLflow experiment and parent
run, the status (running | finished | partial | failed | killed), the status of every Tuner
(``tuners``: started | done | failed | skipped), what failed in each failed Tuner (``failures``: Tuner key ->
{pair key: why}, what ``--resume`` redoes) and the cross-check cases once chosen. Written
atomically; with a storage (``--storage``) every save is mirrored to
``sweeps/<sweep_id>/sweep.json`` there, so that ``--resume`` works from a driver on another node
(:meth:`SweepState.pull`).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from sweep.config import SweepConfig
from sweep.errors import ConfigError, SweepError


class SweepState:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.storage = None     # a trainables.storage.Storage to mirror every save to
        self.lock = threading.RLock()       # the sweep's Tuners run in threads of the driver

    @property
    def stored_key(self) -> str:
        return f"sweeps/{self.sweep_id}/sweep.json"

    @property
    def sweep_id(self) -> str:
        return self.data["sweep_id"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.data, indent=1, default=str)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            if self.storage is not None:
                self.storage.write_text(self.stored_key, text)

    def tuner_status(self, key: str) -> str | None:
        """Tuner ``key``'s status: started, done, failed, skipped, or None (not started)."""
        return self.data["tuners"].get(key)

    def set_tuner_status(self, key: str, status: str) -> None:
        with self.lock:
            self.data["tuners"][key] = status
            if status != "failed":
                self.failures.pop(key, None)
            self.save()

    @property
    def failures(self) -> dict[str, dict[str, str]]:
        """Tuner key -> {pair key: why} of the Tuners whose status is ``failed``."""
        return self.data.setdefault("failures", {})

    def set_failed(self, key: str, what: dict[str, str]) -> None:
        """Tuner ``key`` failed for the pairs in ``what``; ``--resume`` runs those again."""
        with self.lock:
            self.failures[key] = dict(what)
            self.set_tuner_status(key, "failed")

    def config(self) -> SweepConfig:
        """The sweep's config, rebuilt from the stored (normalised) preset."""
        from sweep.config import rebuild_config

        return rebuild_config(self.data["preset"], self.data["config"], tuple(self.data.get("overrides", ())),
                              source=str(self.dir / "config.yaml"))

    # -- finding sweeps ---------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: SweepConfig, workdir: Path) -> "SweepState":
        base = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.config_hash()[:6]}"
        sweep_id, n = base, 1
        while (workdir / "sweeps" / sweep_id).exists():
            n += 1
            sweep_id = f"{base}-{n}"
        d = workdir / "sweeps" / sweep_id
        d.mkdir(parents=True)
        state = cls(d / "sweep.json", {
            "sweep_id": sweep_id, "preset": cfg.name, "config_hash": cfg.config_hash(),
            "config": cfg.to_dict(), "overrides": list(cfg.overrides), "status": "running",
            "created": time.time(), "tuners": {}, "failures": {}, "parent_run_id": None,
            "crosscheck_cases": {}})
        state.save()
        return state

    @classmethod
    def pull(cls, storage, workdir: Path) -> int:
        """Copy into ``workdir`` the stored sweep states it lacks or holds older copies of (a new
        driver resuming a sweep another node's driver ran); returns how many it copied."""
        copied = 0
        for rel in storage.list_files("sweeps"):
            if not rel.endswith("/sweep.json") or rel.count("/") != 1:
                continue
            text = storage.read_text(f"sweeps/{rel}")
            local = workdir / "sweeps" / rel
            if local.is_file() and local.read_text() == text:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(text)
            copied += 1
        return copied

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        data = json.loads(path.read_text())
        data.setdefault("tuners", data.pop("phases", {}))     # a state that names it "phases" loads too
        return cls(path, data)

    @classmethod
    def all_in(cls, workdir: Path) -> Iterator["SweepState"]:
        """Every readable sweep state under ``workdir/sweeps``."""
        root = workdir / "sweeps"
        for p in sorted(root.glob("*/sweep.json")) if root.is_dir() else []:
            try:
                yield cls.load(p)
            except (OSError, ValueError):
                continue

    @classmethod
    def to_resume(cls, workdir: Path, cfg: SweepConfig, resume: bool | str) -> "SweepState":
        """The sweep ``--resume`` continues: the one ``resume`` names, or the newest unfinished
        sweep of ``cfg`` (same preset and config hash)."""
        root = workdir / "sweeps"
        if isinstance(resume, str):
            p = root / resume / "sweep.json"
            if not p.is_file():
                raise SweepError(f"no sweep {resume!r} in {root}")
            state = cls.load(p)
            if state.data["config_hash"] != cfg.config_hash():
                raise SweepError(f"sweep {resume} was started with another configuration "
                                 f"(hash {state.data['config_hash']}, now {cfg.config_hash()}); resume it "
                                 f"with the same preset and --set overrides: {' '.join(state.data['overrides'])}")
            return state
        candidates = [s for s in cls.all_in(workdir) if s.data.get("status") != "finished"
                      and s.data.get("preset") == cfg.name and s.data.get("config_hash") == cfg.config_hash()]
        if not candidates:
            raise SweepError(f"nothing to resume: no unfinished sweep of preset {cfg.name} with this "
                             f"configuration (hash {cfg.config_hash()}) in {root}; run without --resume")
        return max(candidates, key=lambda s: s.data["created"])

    @classmethod
    def named(cls, sweep_id_or_preset: str, workdir: Path) -> "SweepState":
        """A sweep by its id, or a preset's newest sweep (finished ones first)."""
        root = workdir / "sweeps"
        direct = root / sweep_id_or_preset / "sweep.json"
        if direct.is_file():
            return cls.load(direct)
        states = list(cls.all_in(workdir))
        mine = [s for s in states if s.data.get("preset") == sweep_id_or_preset]
        if not mine:
            known = sorted(s.sweep_id for s in states)
            raise SweepError(f"no sweep or preset {sweep_id_or_preset!r} in {root}"
                             + (f"; sweeps there: {', '.join(known)}" if known else ""))
        return max(mine, key=lambda s: (s.data.get("status") == "finished", s.data["created"]))

    @classmethod
    def seed_siblings(cls, sweep_id_or_preset: str, workdir: Path) -> tuple["SweepState", list["SweepState"]]:
        """One experiment over seeds: (the reference, its sweeps sorted by seed). The reference is
        the sweep named, or of a preset's sweeps the finished one that searched, over the most
        attacks, newest. For every other seed: the sweep of the same preset that measures some of
        its rows the same way (``SweepConfig.seed_free_hash``: the same config but the seed and the
        search, over some of its attacks), preferring finished, then more attacks, then newer."""
        if (workdir / "sweeps" / sweep_id_or_preset / "sweep.json").is_file():
            ref = cls.named(sweep_id_or_preset, workdir)
        else:
            cls.named(sweep_id_or_preset, workdir)          # the error naming what is there, if none
            ref = max((s for s in cls.all_in(workdir) if s.data.get("preset") == sweep_id_or_preset),
                      key=lambda s: (s.data.get("status") == "finished", _searches(s),
                                     len(s.data["config"].get("attacks", {})), s.data["created"]))
        ref_cfg = ref.config()
        ref_attacks = {a.name for a in ref_cfg.attacks}
        per_seed: dict[int, tuple[tuple, SweepState]] = {}
        for s in cls.all_in(workdir):
            if s.data.get("preset") != ref.data.get("preset"):
                continue
            try:
                cfg = s.config()
            except ConfigError:         # a sweep of an older, now invalid config: not a sibling
                continue
            attacks = tuple(a.name for a in cfg.attacks)
            if not set(attacks) <= ref_attacks or cfg.seed_free_hash() != ref_cfg.seed_free_hash(attacks):
                continue
            rank = (s.sweep_id == ref.sweep_id, s.data.get("status") == "finished", len(attacks), s.data["created"])
            if cfg.seed not in per_seed or rank > per_seed[cfg.seed][0]:
                per_seed[cfg.seed] = (rank, s)
        return ref, [per_seed[k][1] for k in sorted(per_seed)]


def _searches(state: SweepState) -> bool:
    """Whether a sweep sampled configurations (not only the paper default and its ``also_try``)."""
    try:
        return state.config().searches
    except ConfigError:
        return False
