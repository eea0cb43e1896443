"""Training checkpoints (``trainables.checkpoint``): a defense trial or attack stage stopped
mid-way and retried goes on from its last checkpoint and ends exactly where a run never stopped
would (same weights, same log, no step logged twice), through every kind of phase: the engine's
loop, an early-stopped loop (DLP's AU), a loop of a defense's own (DLP's FixMatch), tensors
trained outside the model (MCR's curve) and two phases in a row (NBA's teacher and student)."""
from __future__ import annotations

import pytest
import torch

from trainables.checkpoint import PhaseCheckpoints, checkpointing
from trainables.engine import SGDConfig, pick_runtime, prepare, train
from trainables.models import build_model
from trainables.stages import resolve_attack_stage, resolve_defense, run_attack_stage, run_defense_stage
from trainables.storage import open_storage

RT = pick_runtime("cpu")


def quiet(_msg: str) -> None:
    pass


class NodeLost(Exception):
    """Stands for the process dying (a lost node) in the middle of a run."""


def weights(model) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small BadNets attack stage (300 synthetic training images, 2 epochs)."""
    spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", "badnets", {"pattern": "white", "patch_size": 5},
                                {"epochs": 2, "batch_size": 64}, 0)
    return run_attack_stage(spec, tmp_path_factory.mktemp("cache"), rt=RT, progress=quiet)


def test_a_phase_keeps_every_kth_state_and_its_last(tmp_path):
    storage = open_storage(str(tmp_path))
    phase = PhaseCheckpoints(storage, "run", every=2).next_phase()
    kept = []
    for epoch in range(1, 6):
        phase.save({"epoch": epoch, "epochs": 5, "done": epoch == 5})
        state = PhaseCheckpoints(storage, "run").next_phase().load()
        kept.append(state and state["epoch"])
    assert kept == [None, 2, 2, 4, 5]
    PhaseCheckpoints(storage, "run").clear()
    assert storage.list_files("run") == []
    with pytest.raises(ValueError, match="checkpoint_every"):
        PhaseCheckpoints(storage, "run", every=0)


def test_a_run_that_ended_replays_nothing(tmp_path, synthetic):
    """A retried run whose training had all ended (it died after, say in the final evaluation)
    restores every phase at once: the same weights, no epoch trained again."""
    data = synthetic.train.subset(torch.arange(64))
    cfg = SGDConfig(epochs=2, lr=0.05, batch_size=32)
    storage = open_storage(str(tmp_path))

    def run():
        torch.manual_seed(0)
        model = prepare(build_model("wrn-16-1", 10), RT)
        epochs = []
        with checkpointing(PhaseCheckpoints(storage, "run")):
            for seed in (1, 2):          # two phases
                train(model, data, cfg, RT, seed=seed, on_epoch=lambda e, logs: epochs.append(e))
        return weights(model), epochs

    first, trained = run()
    again, retrained = run()
    assert trained == [1, 2, 1, 2] and retrained == []
    assert torch.equal(first, again)


DEFENSES = {
    # SL, the entropy filter, AU ended early by its stop rule, then DLP's own FixMatch loop
    "dlp": {"sl_epochs": 2, "au_epochs": 3, "au_stop_accuracy": 0.99, "assft_epochs": 3, "gamma": 0.05,
            "mu": 2, "batch_size": 32},
    # the w2 endpoint, then the curve's θ (trained tensors that are not the model's)
    "mcr": {"endpoint_epochs": 2, "epochs": 3, "batch_size": 32},
    # the teacher, then the student
    "nba": {"teacher_epochs": 2, "epochs": 3, "pgd_steps": 1, "batch_size": 32, "max_grad_norm": 5.0},
}
# the step at which the run dies: in the last phase, after at least one of its checkpoints
CRASH_AT = {"dlp": "assft", "mcr": "mcr-curve", "nba": "nba"}


@pytest.mark.slow
@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_a_defense_trial_stopped_mid_way_goes_on_from_its_checkpoint(defense, artifact, tmp_path):
    dspec = resolve_defense(defense, DEFENSES[defense], clean_fraction=0.2, seed=1)

    def run(checkpoints, out, report=None):
        with checkpointing(checkpoints):
            return run_defense_stage(artifact, dspec, tmp_path / out, rt=RT, report=report, progress=quiet,
                                     epoch_eval_size=50)

    whole = run(None, "whole")
    steps = [(e["stage"], e["step"]) for e in whole["history"]]
    assert [s for _, s in steps] == list(range(1, len(steps) + 1))

    storage = open_storage(str(tmp_path / "storage"))
    reported = []

    def die_in_the_last_phase(entry):
        reported.append(entry)
        if sum(e["stage"] == CRASH_AT[defense] for e in reported) == 2:
            raise NodeLost

    with pytest.raises(NodeLost):
        run(PhaseCheckpoints(storage, "trial"), "crashed", report=die_in_the_last_phase)
    crashed_at = reported[-1]["step"]
    retry = PhaseCheckpoints(storage, "trial")
    assert retry.resume_phase >= 1
    reported = []
    again = run(retry, "retried", report=reported.append)
    # the retry logs only what came after its checkpoint: the step it died in, and on
    assert [e["step"] for e in reported] == list(range(crashed_at, len(steps) + 1))
    assert [(e["stage"], e["step"]) for e in again["history"]] == steps
    assert [e.get("loss") for e in again["history"]] == [e.get("loss") for e in whole["history"]]
    assert again["after"] == whole["after"]
    model = {k: torch.load(tmp_path / k / "model.pt", weights_only=True) for k in ("whole", "retried")}
    for name, value in model["whole"].items():
        assert torch.equal(model["retried"][name], value), name


def test_an_attack_stage_lost_mid_way_is_rebuilt_from_its_checkpoint(tmp_path, monkeypatch):
    """The stage's node dies right after its epoch-1 checkpoint: the retry (Ray's, on any node
    that sees the cache) trains epoch 2 only and ends with the weights of a build never stopped;
    the finished entry leaves no checkpoint behind."""
    from trainables import checkpoint as ckpt

    spec = resolve_attack_stage("synthetic:300:100", "wrn-16-1", "badnets", {}, {"epochs": 2, "batch_size": 64}, 0)
    whole = run_attack_stage(spec, tmp_path / "whole", rt=RT, progress=quiet)

    save = ckpt.Phase.save

    def save_then_die(self, state):
        save(self, state)
        if state["epoch"] == 1:
            raise NodeLost

    monkeypatch.setattr(ckpt.Phase, "save", save_then_die)
    with pytest.raises(NodeLost):
        run_attack_stage(spec, tmp_path / "cache", rt=RT, progress=quiet)
    monkeypatch.setattr(ckpt.Phase, "save", save)
    assert open_storage(str(tmp_path / "cache")).list_files(".checkpoints") == [f"{spec.hash()}/phase-0.pt"]
    lines = []
    retried = run_attack_stage(spec, tmp_path / "cache", rt=RT, progress=lines.append)
    assert any("resuming from the checkpoint after epoch 1/2" in line for line in lines)
    assert sum("epoch 2/2" in line for line in lines) == 1 and not any("epoch 1/2 " in line for line in lines)
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (whole, retried))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open_storage(str(tmp_path / "cache")).list_files(".checkpoints") == []
