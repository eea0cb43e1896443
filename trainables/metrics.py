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
