"""MCR's second endpoint as a twin attack stage: the same attack trained again from another
seed (``AttackStageSpec.twin``), planned by the sweep beside the stages and trained into the
stage cache on first use elsewhere."""
import json
import shutil

import pytest
import torch

from sweep.config import load_preset
from sweep.planning import make_plan
from trainables.artifacts import ArtifactCache
from trainables.engine import pick_runtime
from trainables.params import ParamError
from trainables.rundir import load_model
from trainables.stages import (TWIN_SEED_OFFSET, AttackStageSpec, resolve_attack_stage, resolve_defense,
                               run_attack_stage, run_defense_stage)

RT = pick_runtime("cpu")
DATA = "synthetic:300:100"


def quiet(_msg: str) -> None:
    pass


def test_a_twin_is_the_same_stage_at_a_seed_no_sweep_defends():
    spec = resolve_attack_stage(DATA, "wrn-16-1", "badnets", {}, {"epochs": 1}, seed=3)
    twin = spec.twin()
    assert twin.seed == 3 + TWIN_SEED_OFFSET and twin.attack_params == spec.attack_params
    assert twin.train == spec.train and twin.hash() != spec.hash()


def test_the_plan_trains_twins_only_for_a_defense_that_asks_for_them():
    base = ["attacks=[badnets, blend]", "paper_table=null", "search.stages=2"]
    plain = make_plan(load_preset("quickstart", base + ["defenses=[mcr]"]))
    assert not any(s.twin for s in plain.stages)
    twins = make_plan(load_preset("quickstart", base + ["defenses={mcr: {params: {endpoint: twin}}}"]))
    for attack in ("badnets", "blend"):
        stages = twins.stages_for(attack)
        assert stages == plain.stages_for(attack)           # the defended stages are unchanged
        found = sorted((s for s in twins.stages if s.twin and s.attack == attack), key=lambda s: s.index)
        assert [s.spec for s in found] == [s.spec.twin() for s in stages]
    assert len(twins.stages) == len(plain.stages) + 4


def test_mcr_with_a_twin_endpoint_trains_the_twin_into_the_cache_and_curves_to_it(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    spec = resolve_attack_stage(DATA, "wrn-16-1", "badnets", {}, {"epochs": 1})
    stage = run_attack_stage(spec, cache, rt=RT, progress=quiet)
    assert AttackStageSpec.of_artifact(json.loads((stage / "spec.json").read_text())) == spec
    # t = 1 is the second endpoint itself: its parameters are the twin's
    dspec = resolve_defense("mcr", {"endpoint": "twin", "t": 1.0, "epochs": 1}, 0.2)
    result = run_defense_stage(stage, dspec, tmp_path / "out", rt=RT, progress=quiet)
    twin_dir = cache.lookup(spec.twin().hash())
    assert twin_dir is not None
    twin, repaired = load_model(twin_dir), load_model(tmp_path / "out")
    for (name, a), b in zip(twin.named_parameters(), repaired.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(h["stage"] == "mcr-endpoint" for h in result["history"])
    assert any(not torch.equal(a, b) for a, b in zip(twin.parameters(), load_model(stage).parameters()))


def test_a_twin_endpoint_needs_a_cached_attack_stage(tmp_path):
    spec = resolve_attack_stage(DATA, "wrn-16-1", "badnets", {}, {"epochs": 1})
    stage = run_attack_stage(spec, tmp_path / "cache", rt=RT, progress=quiet)
    loose = tmp_path / "loose"
    shutil.copytree(stage, loose)          # the same files, not an entry of any cache
    dspec = resolve_defense("mcr", {"endpoint": "twin", "epochs": 1}, 0.2)
    with pytest.raises(ParamError, match="endpoint=twin needs the suspicious model to be a cached attack stage"):
        run_defense_stage(loose, dspec, None, rt=RT, progress=quiet)
    assert ArtifactCache(tmp_path / "cache").lookup(spec.twin().hash()) is None
    assert AttackStageSpec.of_artifact({"stage": "defense"}) is None
