"""Seeded, class-stratified subsets (the clean data that post-training defenses receive)."""
from __future__ import annotations

import math

import torch


def clean_subset(labels: torch.Tensor, fraction: float, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted int64 indices of a seeded, class-stratified ``fraction`` of the whole set.

    The size is ``round(fraction * len(labels))``, split over the classes in proportion to their
    sizes (largest remainder), so 0.05 of CIFAR-10's 50,000 is 2,500 = 250 per class. Indices in
    ``exclude`` (an index tensor, or a boolean mask over ``labels``; e.g. the poisoned indices)
    are never drawn; a class that has fewer candidates left than its share gives all it has, so
    the subset can then be smaller than asked. The same (labels, fraction, seed, exclude) always
    gives the same indices.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"clean_subset: fraction must be a number in (0, 1], got {fraction!r}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"clean_subset: labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = labels.numel()
    labels = labels.to(torch.int64)

    allowed = torch.ones(n, dtype=torch.bool)
    if exclude is not None:
        exclude = torch.as_tensor(exclude)
        if exclude.dtype == torch.bool:
            if exclude.shape != (n,):
                raise ValueError(f"clean_subset: a boolean exclude mask must have shape ({n},), got {tuple(exclude.shape)}")
            allowed &= ~exclude
        elif exclude.numel():
            exclude = exclude.reshape(-1).to(torch.int64)
            if int(exclude.min()) < 0 or int(exclude.max()) >= n:
                raise ValueError(f"clean_subset: exclude holds indices outside [0, {n})")
            allowed[exclude] = False

    classes, counts = torch.unique(labels, return_counts=True)
    total = round(fraction * n)
    exact = counts.to(torch.float64) * total / max(n, 1)
    quota = exact.floor().to(torch.int64)
    short = total - int(quota.sum())
    if short > 0:  # largest remainder; ties go to the lower class
        order = torch.argsort(-(exact - quota), stable=True)
        quota[order[:short]] += 1

    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        candidates = ((labels == c) & allowed).nonzero(as_tuple=True)[0]
        perm = torch.randperm(len(candidates), generator=g)
        picked.append(candidates[perm[: min(q, len(candidates))]])
    if not picked:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(picked).sort().values
