"""The sweep's attack stages: every distinct stage of the plan trained once, as Ray tasks (clean
models first, then the attacks in parallel), through the content-addressed cache; each gets an
MLflow child run of the sweep.

A task runs on any node. With a storage, it publishes the stage there and the driver reads it
back through its own copy; Ray retries a task whose node was lost (``max_failures`` times) and
the retry resumes from the stage's per-epoch checkpoint in the storage."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from sweep.execution._context import SweepContext
from sweep.planning import StagePlan


def _attack_stage_task(spec_key: dict, cache_dir: str, storage: tuple[str | None, str | None],
                       data_root: str | None, epoch_eval_size: int, cpus: float, checkpoint_every: int) -> dict:
    """A Ray task: one attack stage (trains it unless the cache holds it)."""
    import torch

    from trainables.stages import AttackStageSpec, run_attack_stage
    from trainables.tune_trainable import stage_cache

    torch.set_num_threads(max(1, int(cpus or 1)))
    spec = AttackStageSpec(**{k: v for k, v in spec_key.items() if k != "stage"})
    cache = stage_cache(cache_dir, *storage)
    cached = cache.lookup(spec.hash()) is not None
    run_attack_stage(spec, cache, data_root=data_root, epoch_eval_size=epoch_eval_size,
                     checkpoint_every=checkpoint_every)
    return {"trained": not cached}


def run_attack_stages(ctx: SweepContext, stop: threading.Event | None = None) -> None:
    """Fill ``ctx.stage_dirs`` (and ``trained_stages``/``failed_stages``) as each stage ends. One
    failing stage does not stop the others; a failed clean model stops the attacks that need it.
    Returns early once ``stop`` is set (the sweep was interrupted)."""
    import ray

    cfg, cache = ctx.cfg, ctx.cache()
    storage = (ctx.storage.uri, ctx.storage.endpoint) if ctx.storage else (None, None)
    task = ray.remote(_attack_stage_task)
    for level in (0, 1):
        wave = [s for s in ctx.plan.stages if s.level == level]
        refs = {}
        for s in wave:
            hit = cache.lookup(s.hash)      # a verified entry: no task (and no worker) needed
            if hit is not None:
                ctx.stage_dirs[s.hash] = str(hit)
                ctx.progress(f"attack stage {s.attack} ({s.hash[:8]}) cached: {hit}")
                _log_stage_run(ctx, s, Path(hit), trained=False)
                continue
            refs[s.hash] = task.options(num_cpus=cfg.resources.attack_cpus, num_gpus=cfg.resources.attack_gpus,
                                        name=f"attack-stage-{s.attack}-{s.hash[:8]}",
                                        max_retries=cfg.max_failures).remote(   # on node loss
                s.spec.key(), str(ctx.cache_dir), storage, cfg.data_root, cfg.epoch_eval_size,
                cfg.resources.attack_cpus, cfg.checkpoint_every)
        if refs:
            ctx.progress(f"attack stages: {len(refs)} to run ({', '.join(s.attack for s in wave if s.hash in refs)})")
        pending = dict(refs)
        while pending:
            done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=1.0)
            if stop is not None and stop.is_set():
                return
            if not done:
                continue
            h = next(k for k, v in pending.items() if v == done[0])
            del pending[h]
            s = next(x for x in wave if x.hash == h)
            try:
                out = ray.get(done[0])
            except Exception as e:   # one attack stage failing must not stop the others
                _stage_failed(ctx, s, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                continue
            path = cache.lookup(h)       # the task's node wrote it; with a storage, copied here now
            if path is None:
                _stage_failed(ctx, s, "the finished stage is not in the cache "
                                      f"{cache.remote.uri if cache.remote else cache.root}")
                continue
            ctx.stage_dirs[h] = str(path)
            if out["trained"]:
                ctx.trained_stages.append(h)
            ctx.progress(f"attack stage {s.attack} ({h[:8]}) {'trained' if out['trained'] else 'cached'}: {path}")
            _log_stage_run(ctx, s, path, trained=out["trained"])
        if level == 0 and ctx.failed_stages:
            break


def _stage_failed(ctx: SweepContext, s: StagePlan, msg: str) -> None:
    ctx.failed_stages[s.attack] = msg
    ctx.progress(f"attack stage {s.attack} ({s.hash[:8]}) FAILED: {msg}")
    _log_stage_run(ctx, s, None, error=msg)


def _log_stage_run(ctx: SweepContext, s: StagePlan, path: Path | None, trained: bool = False,
                   error: str | None = None) -> None:
    """One attack child run per distinct stage and sweep (reattached on resume); a twin stage's
    has the role ``twin``, so that no table or report reads it as the attack's stage."""
    tracker = ctx.tracker
    role = "twin" if s.twin else "attack"
    existing = tracker.find_run(ctx.state.sweep_id, role=role, attack_hash=s.hash)
    if existing is not None and existing.info.status == "FINISHED":
        return
    spec = s.spec
    tags = {**ctx.base_tags, "role": role, "attack": s.attack, "defense": "none", "attack_hash": s.hash,
            "dataset": spec.dataset, "cached": str(not trained).lower(), "fully_trained": "true"}
    if existing is not None:       # left open by a crashed driver, or FAILED before a --resume
        run_id = existing.info.run_id
        tracker.set_tags(run_id, tags)
        if error is None:
            tracker.delete_tags(run_id, ["error"])
    else:
        params = {**spec.attack_params, **{f"train.{k}": v for k, v in spec.train.items()}}
        run_id = tracker.create_run(f"{role}/{s.attack}/{s.hash[:8]}", tags, ctx.parent_run_id, params)
    if error is not None:
        tracker.set_tags(run_id, {"error": error[:5000], "fully_trained": "false"})
        tracker.end(run_id, "FAILED")
        return
    metrics = json.loads((path / "metrics.json").read_text())
    for entry in metrics.get("history") or []:
        tracker.log_metrics(run_id, {k: v for k, v in entry.items() if k != "epoch"}, step=int(entry.get("epoch", 0)))
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(run_id, final, step=len(metrics.get("history") or []))
    tracker.log_artifacts(run_id, [path / f for f in ("model.pt", "spec.json", "metrics.json", "attack_state.pt")], "model")
    tracker.log_artifacts(run_id, [path / "samples.png"])
    tracker.set_tags(run_id, {"artifact_dir": str(path)})
    tracker.end(run_id, "FINISHED")
