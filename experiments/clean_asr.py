"""The ASR a CLEAN model shows under each attack's trigger: the part of an attack's ASR that the
trigger itself causes (an adversarial or class-like pattern), not the backdoor.

    python experiments/clean_asr.py CLEAN_ENTRY ATTACK_ENTRY [ATTACK_ENTRY ...]

CLEAN_ENTRY is an attack-stage cache entry of attack ``none`` (the clean model TrojanNN, CLA and
CheatKD fit on); each ATTACK_ENTRY an attack's cache entry, whose stored trigger is applied to the
test set exactly as the attack stage's ASR does (``triggered_test_set``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.attacks.base import triggered_test_set  # noqa: E402
from trainables.engine import pick_runtime, prepare  # noqa: E402
from trainables.stages import Evaluator, load_attack_artifact  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    rt = pick_runtime()
    clean = load_attack_artifact(sys.argv[1])
    if clean.attack is not None:
        raise SystemExit(f"{sys.argv[1]}: not a clean model (attack {clean.spec['attack']['name']})")
    model = prepare(clean.model, rt)
    rows = []
    for entry in sys.argv[2:]:
        art = load_attack_artifact(entry, dataset=clean.dataset)
        if art.spec["dataset"] != clean.spec["dataset"]:
            raise SystemExit(f"{entry}: dataset {art.spec['dataset']} differs from the clean model's")
        m = Evaluator(clean.dataset, triggered_test_set(art.attack, clean.dataset.test), art.target, rt)(model)
        row = {"entry": entry, "attack": art.spec["attack"], "clean_model": {k: m[k] for k in ("ba", "asr", "ra")},
               "backdoored": {k: art.metrics.get(k) for k in ("ba", "asr", "ra")}}
        print(f"{art.spec['attack']['name']:9s} clean model ASR {100 * m['asr']:6.2f}%  "
              f"(backdoored model: {100 * art.metrics['asr']:6.2f}%)", flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
