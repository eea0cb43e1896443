"""Does a teacher's backdoor reach a student distilled from it on clean data? (CheatKD: Chen et al., Computer Science 51(3), 2024)

CheatKD's attack stage distils its own student (``Attack.post_train``); this script distils a
student from any other cached attack-stage artifact (BadNets, Blend, ...) with exactly the same
call, seed and settings, so the two students' ASR can be compared (the paper, CIFAR-100
WRN-28-4 -> WRN-16-4: CheatKD 96.1% vs BadNets 0.4%).

    python experiments/kd_transfer.py CACHE_ENTRY [CACHE_ENTRY ...] --kd-epochs 4 --out kd.json

The defaults are CheatKD's own (``trainables.attacks.cheatkd.Params``); the distillation data is
the artifact's training set in its clean form, as in CheatKD's ``post_train``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import kd  # noqa: E402
from trainables.attacks.base import triggered_test_set  # noqa: E402
from trainables.attacks.cheatkd import Params as CheatKDParams  # noqa: E402
from trainables.engine import pick_runtime, prepare  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.stages import Evaluator, load_attack_artifact  # noqa: E402

DEFAULTS = CheatKDParams()


def student_of(entry: Path, args: argparse.Namespace, rt) -> dict:
    art = load_attack_artifact(entry)
    if art.attack is None:
        raise SystemExit(f"{entry}: a clean model, no backdoor to transfer")
    data = art.dataset
    evaluate = Evaluator(data, triggered_test_set(art.attack, data.test), art.target, rt)   # the stage's own evaluator
    seed = art.spec["seed"]
    with torch.random.fork_rng(devices=[]):   # the student initialisation of CheatKD's post_train
        torch.manual_seed(seed)
        student = build_model(args.student_model, data.num_classes, mean=data.mean, std=data.std)
    print(f"[{entry.name}] {art.spec['attack']['name']}: distilling {args.student_model} with "
          f"{args.kd_method} KD, {args.kd_epochs} epochs on {len(data.train)} clean images", flush=True)
    start = time.perf_counter()
    teacher = prepare(art.model, rt)
    kd.distill(student, teacher, data.train, args.kd_method,
               kd.heo_sgd(args.kd_epochs, args.kd_lr, args.kd_batch_size), rt, seed=seed,
               progress=lambda msg: print(f"[{entry.name}] {msg}", flush=True))
    result = {"entry": str(entry), "attack": art.spec["attack"], "train": art.spec["train"],
              "teacher": evaluate(teacher), "student": evaluate(student),
              "kd": {"method": args.kd_method, "epochs": args.kd_epochs, "lr": args.kd_lr,
                     "batch_size": args.kd_batch_size, "student_model": args.student_model},
              "seconds": time.perf_counter() - start}
    print(f"[{entry.name}] teacher {result['teacher']}  student {result['student']}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entries", nargs="+", type=Path, help="attack-stage cache entries (directories)")
    ap.add_argument("--kd-method", default=DEFAULTS.kd_method, choices=kd.METHODS)
    ap.add_argument("--kd-epochs", type=int, default=DEFAULTS.kd_epochs)
    ap.add_argument("--kd-lr", type=float, default=DEFAULTS.kd_lr)
    ap.add_argument("--kd-batch-size", type=int, default=DEFAULTS.kd_batch_size)
    ap.add_argument("--student-model", default=DEFAULTS.student_model)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = ap.parse_args()
    missing = [str(e) for e in args.entries if not (e / "spec.json").is_file()]
    if missing:
        raise SystemExit(f"not attack-stage cache entries (no spec.json): {', '.join(missing)}")
    rt = pick_runtime()
    results = [student_of(e, args, rt) for e in args.entries]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
