"""``python -m sweep bench train|sweep|early-stopping``: benchmarks that print figures and assert
nothing (training throughput against a reference loop; a reduced sweep's trials per hour and
utilisation; what early stopping saves). Outside the production path: only the CLI imports it."""
from __future__ import annotations


def main(args) -> int:
    """Run the benchmark ``args.what`` names (the CLI's ``bench`` options)."""
    if args.what == "train":
        from sweep.bench._train import main as run
    elif args.what in ("sweep", "early-stopping"):
        from sweep.bench._sweep import main as run
    else:
        raise SystemExit(f"unknown benchmark {args.what!r}; available: train, sweep, early-stopping")
    return run(args)


__all__ = ["main"]
