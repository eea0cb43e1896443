"""Ray Tune function trainables: one defense trial, or one attack trial of an attack sweep.

Both are plain functions ``fn(config, job)``: ``config`` is what the searcher proposed (flat
parameter names; categorical tuple choices arrive comma-joined and are decoded here), ``job`` is
the fixed part of the trial, a plain dict the sweep binds with ``tune.with_parameters``:

    defense, attack, attack_hash, artifact_dir, fixed (params), decoders, clean_fraction, seed,
    data_root, trials_dir, epoch_eval_size, cpus, objectives, cases (cross-check), fail_if (tests)

A defense trial loads its attack-stage artifact, runs the defense, ``tune.report``s every epoch
(``step``, ``stage``, the loss terms, and ``ba``/``asr``/``ra`` where measured, NaN where not,
with ``measured`` saying which) and reports the final metrics once more with
``fully_trained=True``; a trial a scheduler stops early never sends that last report. Outputs go
to ``<trials_dir>/<trial_id>/`` (the standard model.pt/spec.json/metrics.json). Nothing here
imports ``sweep``: the trainable runs on any Ray worker that has ``trainables`` installed.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
from pathlib import Path
from typing import Any

TEST_FAIL_ENV = "SWEEP_TEST_FAIL_TRIAL"   # test-only hook, see ``check_test_failure``
NAN = float("nan")


class InjectedFailure(RuntimeError):
    """Raised by the test-only failure hook."""


def decode(config: dict, decoders: dict | None) -> dict:
    """The searcher's flat config -> method parameters (tuple choices decoded)."""
    out = {}
    for k, v in config.items():
        table = (decoders or {}).get(k)
        out[k] = table[v] if table is not None and v in table else v
    return out


def trial_case(config: dict, job: dict) -> dict:
    """What this trial runs: ``{attack, attack_hash, artifact_dir, params, phase}``.

    A case trial (``config = {"xcheck": i}``) runs the fixed configuration ``job["cases"][i]``
    (a paper-default trial, or a cross-check of one attack's best config on another attack); a
    search trial runs the searcher's proposal on the job's attack.
    """
    if "xcheck" in config:
        case = dict(job["cases"][int(config["xcheck"])])
        case.setdefault("phase", "crosscheck")
        case.setdefault("defense", job.get("defense"))
        return case
    return {"attack": job.get("attack"), "attack_hash": job.get("attack_hash"), "defense": job.get("defense"),
            "artifact_dir": job.get("artifact_dir"), "phase": "search",
            "params": {**job.get("fixed", {}), **decode(config, job.get("decoders"))}}


def check_test_failure(params: dict, expr: str | None, marker_dir: str | Path | None = None) -> None:
    """Test-only hook (``SWEEP_TEST_FAIL_TRIAL``): ``expr`` like ``"lr<0.05"`` (``<``, ``>``,
    ``=``) makes every trial whose parameter satisfies it raise; ``"once:lr<0.05"`` only the first
    such trial (a marker file in ``marker_dir`` claims the failure atomically), so tests can check
    that a failing trial fails alone."""
    if not expr:
        return
    once = expr.startswith("once:")
    m = re.fullmatch(r"\s*(\w+)\s*([<>=])\s*(.+?)\s*", expr[5:] if once else expr)
    if not m or m.group(1) not in params:
        return
    name, op, text = m.groups()
    value = params[name]
    try:
        ref: Any = float(text)
        value = float(value)
    except (TypeError, ValueError):
        ref = text
    hit = (op == "<" and value < ref) or (op == ">" and value > ref) or (op == "=" and value == ref)
    if hit and once and marker_dir is not None:
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(Path(marker_dir) / ".test-failure-injected", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            hit = False
    if hit:
        raise InjectedFailure(f"{TEST_FAIL_ENV}: injected failure for {name}={params[name]!r} ({expr})")


def _numeric(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def _release_memory() -> None:
    """Fractional GPUs share one device's memory: give it back when the trial ends."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:   # releasing memory must never turn a finished trial into a failed one
        pass


def _setup_threads(job: dict) -> None:
    import torch

    cpus = job.get("cpus") or 1
    torch.set_num_threads(max(1, int(cpus)))


def _score(ba: float, asr: float) -> float:
    """The scalar that early stopping ranks trials by (higher is better)."""
    return ba - asr if math.isfinite(ba) and math.isfinite(asr) else NAN


def defense_trial(config: dict, job: dict) -> None:
    """One defense configuration on one attack-stage artifact, reported to Tune per epoch."""
    from ray import tune

    from trainables.stages import resolve_defense, run_defense_stage

    case = trial_case(config, job)
    check_test_failure(case["params"], job.get("fail_if") or os.environ.get(TEST_FAIL_ENV), job.get("trials_dir"))
    _setup_threads(job)
    dspec = resolve_defense(case.get("defense") or job["defense"], case["params"], job["clean_fraction"], job["seed"])
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(job["trials_dir"]) / trial_id

    def report(entry: dict) -> None:
        measured = "ba" in entry and "asr" in entry
        metrics = _numeric(entry)
        for m in ("ba", "asr", "ra", "der"):
            metrics.setdefault(m, NAN)
        metrics.update(step=int(entry.get("step", 0)), stage=str(entry.get("stage", "")),
                       measured=int(measured), fully_trained=False, final=False,
                       score=_score(metrics["ba"], metrics["asr"]))
        tune.report(metrics)

    try:
        result = run_defense_stage(case["artifact_dir"], dspec, out_dir, data_root=job.get("data_root"),
                                   report=report, epoch_eval_size=job.get("epoch_eval_size", 2000))
    finally:
        _release_memory()
    after, before = result["after"], result["before"]
    ips = [h["images_per_second"] for h in result["history"] if isinstance(h.get("images_per_second"), (int, float))]
    final = {**_numeric(after),
             **{f"{k}_before": v for k, v in _numeric(before).items()},
             "der": result["der"] if result["der"] is not None else NAN,
             "train_seconds": float(result["seconds"]),
             "images_per_second": sum(ips) / len(ips) if ips else NAN,
             "step": int(result["history"][-1]["step"]) if result["history"] else 0,
             "measured": 1, "fully_trained": True, "final": True, "stage": "final",
             "out_dir": str(out_dir)}
    for m in ("ba", "asr", "ra"):
        final.setdefault(m, NAN)
    final["score"] = _score(final["ba"], final["asr"])
    tune.report(final)


def attack_trial(config: dict, job: dict) -> None:
    """One attack configuration (attack sweeps): train its attack stage (cached by hash) and
    report its metrics (CheatKD's include the distilled student's ``student_ba``/``student_asr``)."""
    from ray import tune

    from trainables.stages import resolve_attack_stage, run_attack_stage

    params = {**job.get("fixed", {}), **decode(config, job.get("decoders"))}
    check_test_failure(params, job.get("fail_if") or os.environ.get(TEST_FAIL_ENV), job.get("trials_dir"))
    _setup_threads(job)
    spec = resolve_attack_stage(job["dataset"], job["model"], job["attack"], params, job["train"], job["seed"])
    try:
        path = run_attack_stage(spec, job["cache_dir"], data_root=job.get("data_root"),
                                epoch_eval_size=job.get("epoch_eval_size", 2000))
    finally:
        _release_memory()
    metrics = json.loads((path / "metrics.json").read_text())
    missing = [m for m in job.get("objectives", ()) if not isinstance(metrics.get(m), (int, float))]
    if missing:
        raise KeyError(f"objective {missing[0]!r} is not among the attack stage's metrics "
                       f"({', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))})")
    history = metrics.get("history") or []
    final = {**_numeric({k: v for k, v in metrics.items() if k != "history"}),
             "history": [_numeric(h) for h in history],
             "step": len(history), "measured": 1, "fully_trained": True, "final": True, "stage": "final",
             "attack_hash": spec.hash(), "out_dir": str(path)}
    tune.report(final)
