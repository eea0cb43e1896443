"""Variants of one defense on one attack stage that share their common first phases.

A defense run is a sequence of training phases (``trainables.checkpoint``: NBA's teacher, then the
student; DLP's SL, AU, then ASSFT). Variants that differ only after phase k can load the first k
phases from the first variant that ran them, so a study of, say, DLP's ASSFT settings pays for SL
and AU once. The CIFAR-10 studies in docs/measurements.md were run this way.

    python experiments/defense_variants.py STAGE_DIR DEFENSE NAME SHARED [key=json ...]

STAGE_DIR: an attack-stage artifact (``python -m sweep run ... --out DIR`` without ``--defense``).
NAME: the variant's name; SHARED: how many leading phases it shares with the other variants of its
group. ``seed=N`` sets the defense seed, ``clean=F`` the clean fraction, ``group=G`` the sharing
group (default: the seed); every other key is a defense parameter, its value JSON
(``tau=0.8``, ``clean_per_class='"each"'``). Output: ``--root``/DEFENSE/STAGE/GROUP/NAME/metrics.json
and a RESULT line; a finished variant is skipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.checkpoint import PhaseCheckpoints, checkpointing  # noqa: E402
from trainables.engine import pick_runtime  # noqa: E402
from trainables.params import ParamError  # noqa: E402
from trainables.stages import defend, load_attack_artifact, resolve_defense  # noqa: E402
from trainables.storage import open_storage  # noqa: E402


def copy_phases(src: Path, dst: Path, count: int) -> None:
    """Copy phase-0 .. phase-(count-1) from ``src`` to ``dst`` where ``dst`` lacks them."""
    for i in range(count):
        f = src / f"phase-{i}.pt"
        if f.exists() and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage")
    ap.add_argument("defense")
    ap.add_argument("name")
    ap.add_argument("shared", type=int)
    ap.add_argument("params", nargs="*", help="key=json")
    ap.add_argument("--root", default="runs/variants")
    args = ap.parse_args(argv)
    kv = dict(a.split("=", 1) for a in args.params)
    seed, clean = int(kv.pop("seed", 0)), float(kv.pop("clean", 0.05))
    group = kv.pop("group", f"s{seed}")
    params = {k: json.loads(v) for k, v in kv.items()}
    base = Path(args.root) / args.defense / Path(args.stage).name / group
    shared, ckpt, out = base / "shared", base / "ckpt" / args.name, base / args.name
    if (out / "metrics.json").exists():
        print(f"skip {out}: finished")
        return 0
    try:
        dspec = resolve_defense(args.defense, params, clean, seed)
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shared.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    copy_phases(shared, ckpt, args.shared)
    art = load_attack_artifact(args.stage)
    start = time.time()
    with checkpointing(PhaseCheckpoints(open_storage(str(ckpt)), "")):
        m = defend(art, dspec, out, rt=pick_runtime("cpu"), progress=lambda line: print(line, flush=True))
    copy_phases(ckpt, shared, args.shared)
    a = m["after"]
    print(f"RESULT {args.defense} {args.name} seed={seed} {params} BA {100 * a['ba']:.2f} "
          f"ASR {100 * a.get('asr', 0):.2f} RA {100 * a.get('ra', 0):.2f} wall {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
