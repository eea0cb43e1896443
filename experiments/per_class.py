"""Per-class test accuracy of the attacked model and of defended models: what a defense costs
the target class (DLP's AU and ABL's unlearning ascend on images that all carry the target label).

    python experiments/per_class.py ATTACK_ENTRY [RUN_DIR ...]

ATTACK_ENTRY is an attack-stage cache entry; each RUN_DIR a ``sweep run`` output directory
(``model.pt`` + ``spec.json``) on the same dataset. Prints one row per model: the accuracy of
every class on the clean test set, the target class marked.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.engine import pick_runtime, predict_logits, prepare  # noqa: E402
from trainables.rundir import load_model  # noqa: E402
from trainables.stages import load_attack_artifact  # noqa: E402


def per_class_accuracy(model, test, num_classes: int, rt) -> list[float]:
    pred = predict_logits(prepare(model, rt), test.x, rt).argmax(dim=1).cpu()
    return [(pred[test.y == c] == c).float().mean().item() for c in range(num_classes)]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    rt = pick_runtime()
    art = load_attack_artifact(sys.argv[1])
    test, classes = art.dataset.test, art.dataset.num_classes
    models = [("attacked model", art.model)] + [(d, load_model(d)) for d in sys.argv[2:]]
    print("| model | " + " | ".join(f"{c}{' (target)' if c == art.target else ''}" for c in range(classes))
          + " |\n| --- |" + " --- |" * classes)
    for name, model in models:
        acc = per_class_accuracy(model, test, classes, rt)
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |", flush=True)


if __name__ == "__main__":
    main()
