"""BA, ASR, RA and DER, the figures every attack and defense reports.

* BA (benign accuracy, also called clean accuracy, CA): accuracy on the clean test set.
* ASR (attack success rate): on triggered test images whose TRUE label is not the target, the
  fraction predicted as the target. A target-class image classified as the target says nothing
  about the backdoor, so those images are excluded (counting them is the most common bug in
  public code).
* RA (robust accuracy): on the same triggered non-target images, the fraction predicted as their
  true label.
* DER (defense effectiveness rating, BackdoorBench): ``[max(0, ΔASR) − max(0, ΔBA) + 1] / 2``
  with ΔASR = ASR before − after and ΔBA = BA before − after.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from trainables.data.base import ImageSet
from trainables.engine import Runtime, accuracy, predict


def asr_and_ra(predictions: torch.Tensor, true_labels: torch.Tensor, target: int) -> tuple[float, float]:
    """(ASR, RA) from predictions on triggered images and their true labels."""
    keep = true_labels != target
    if not bool(keep.any()):
        return float("nan"), float("nan")
    pred, true = predictions[keep], true_labels[keep]
    return (pred == target).float().mean().item(), (pred == true).float().mean().item()


def backdoor_metrics(model: nn.Module, clean_test: ImageSet, triggered_test: ImageSet | None,
                     target: int | None, rt: Runtime) -> dict[str, float]:
    """``{"ba", "asr", "ra"}`` for a model; ``triggered_test`` holds triggered copies of test
    images with their TRUE labels (any rows whose label is the target are ignored)."""
    out = {"ba": accuracy(model, clean_test, rt)}
    if triggered_test is not None and target is not None:
        pred = predict(model, triggered_test.x, rt)
        out["asr"], out["ra"] = asr_and_ra(pred, triggered_test.y.to(pred.device), target)
    return out


def der(before: dict[str, float], after: dict[str, float]) -> float:
    """Defense effectiveness rating: ``[max(0, ΔASR) − max(0, ΔBA) + 1] / 2`` (BackdoorBench)."""
    d_asr = before["asr"] - after["asr"]
    d_ba = before["ba"] - after["ba"]
    return (max(0.0, d_asr) - max(0.0, d_ba) + 1.0) / 2.0


# A defense trial over K attack stages (``search.stages``) reports each stage's metrics as
# ``<metric>_stage<i>`` and their aggregates: the mean, the worst case (ASR's highest, the others'
# lowest) and the sample standard deviation (NaN with one stage).
STAGE_METRICS = ("ba", "asr", "ra", "der")
AGGREGATES = ("mean", "worst", "std")
_WORST = {"asr": max}           # the rest: the lowest is the worst
_STAGE_KEY = re.compile(r"(ba|asr|ra|der|score)_(stage\d+|mean|worst|std)")


def stage_key(metric: str, index: int) -> str:
    return f"{metric}_stage{index}"


def is_stage_metric(name: str) -> bool:
    """Whether ``name`` is a per-stage metric or an aggregate over stages."""
    return _STAGE_KEY.fullmatch(name) is not None


def stage_aggregates(per_stage: list[dict]) -> dict[str, float]:
    """Stage i's ``{ba, asr, ra, der}`` (in order) -> ``<m>_stage<i>`` and ``<m>_mean``,
    ``<m>_worst``, ``<m>_std`` over the stages where ``m`` is finite."""
    out: dict[str, float] = {}
    for m in STAGE_METRICS:
        values = []
        for i, stage in enumerate(per_stage):
            v = stage.get(m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[stage_key(m, i)] = float(v)
                values.append(float(v))
        if values:
            mean = sum(values) / len(values)
            out[f"{m}_mean"] = mean
            out[f"{m}_worst"] = _WORST.get(m, min)(values)
            out[f"{m}_std"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                               if len(values) > 1 else float("nan"))
    return out
