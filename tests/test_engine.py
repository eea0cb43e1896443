"""The training engine, metrics and output directories."""

import pytest
import torch

from trainables.data.loader import batches, random_crop_flip
from trainables.engine import SGDConfig, TrainingDiverged, accuracy, pick_runtime, prepare, train
from trainables.metrics import asr_and_ra, backdoor_metrics, der
from trainables.models import build_model
from trainables.rundir import CheckpointError, load_model, model_spec, write_run_dir

RT = pick_runtime("cpu")


@pytest.mark.slow
def test_wrn_learns_synthetic_well_above_chance(synthetic, trained_clean):
    model, history = trained_clean
    ba = accuracy(model, synthetic.test, RT)
    print(f"\nclean WRN-16-1 ({RT.description}): BA {ba:.3f}")
    # 10 classes: chance is 10%; require five times chance (measured: 0.846 fp32, 0.818 bf16)
    assert ba >= 0.5, f"BA {ba:.3f} after {len(history)} epochs"
    assert history[-1]["loss"] < history[0]["loss"]


def test_training_is_seeded_and_reproducible(synthetic):
    small = synthetic.train.subset(torch.arange(256))
    cfg = SGDConfig(epochs=1, lr=0.05, batch_size=64)

    def run(seed):
        torch.manual_seed(seed)
        m = prepare(build_model("wrn-16-1", 10, synthetic.mean, synthetic.std), RT)
        train(m, small, cfg, RT, seed=seed)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class MemoryCheckpoint:
    """An in-memory ``EpochCheckpoint`` that round-trips through ``torch.save``/``weights_only``,
    as a stored one does."""

    def __init__(self):
        self.blob, self.saves = None, 0

    def load(self):
        import io
        return None if self.blob is None else torch.load(io.BytesIO(self.blob), weights_only=True)

    def save(self, state):
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        self.blob, self.saves = buf.getvalue(), self.saves + 1


def test_a_run_stopped_mid_way_resumes_from_its_checkpoint_to_the_same_weights(synthetic):
    """A run killed after epoch 2 of 3 and retried from its checkpoint ends with the very weights
    (and history) of a run never stopped: same batches, same augmentation, same optimiser state."""
    small = synthetic.train.subset(torch.arange(192))
    cfg = SGDConfig(epochs=3, lr=0.05, batch_size=64)

    def fresh():
        torch.manual_seed(3)
        return prepare(build_model("wrn-16-1", 10, synthetic.mean, synthetic.std), RT)

    def weights(m):
        return torch.cat([t.detach().float().flatten() for t in m.state_dict().values()])

    whole = fresh()
    whole_history = train(whole, small, cfg, RT, seed=5)

    class NodeLost(Exception):
        pass

    def die_after_two(epoch, logs):
        if epoch == 2:
            raise NodeLost

    ckpt, stopped = MemoryCheckpoint(), fresh()
    with pytest.raises(NodeLost):
        train(stopped, small, cfg, RT, seed=5, checkpoint=ckpt, on_epoch=die_after_two)
    assert ckpt.saves == 1 and ckpt.load()["epoch"] == 1
    torch.manual_seed(123)                  # the retry runs in another process: other global RNG
    retried = fresh()
    lines = []
    history = train(retried, small, cfg, RT, seed=5, checkpoint=ckpt, progress=lines.append)
    assert lines[0] == "resuming from the checkpoint after epoch 1/3"
    assert ckpt.saves == 3 and len(history) == 3
    assert [h["loss"] for h in history] == [h["loss"] for h in whole_history]
    assert torch.equal(weights(retried), weights(whole))
    assert not torch.equal(weights(fresh()), weights(whole))


def test_max_grad_norm_bounds_every_step(synthetic):
    """A clipped run moves the weights by at most lr × max_norm per step (plain SGD, no momentum
    or decay); the unclipped run of the same seed moves them much further."""
    small = synthetic.train.subset(torch.arange(64))

    def moved(max_norm):
        torch.manual_seed(0)
        m = prepare(build_model("wrn-16-1", 10, synthetic.mean, synthetic.std), RT)
        before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        cfg = SGDConfig(epochs=1, lr=0.1, batch_size=64, momentum=0.0, weight_decay=0.0,
                        schedule="constant", max_grad_norm=max_norm)
        train(m, small, cfg, RT, seed=0, augment=False)
        return float((torch.cat([p.detach().flatten() for p in m.parameters()]) - before).norm())

    assert moved(1e-3) <= 0.1 * 1e-3 * 1.001
    assert moved(None) > 100 * moved(1e-3)
    # the epoch logs how large the gradients were and how often the clip acted
    m = prepare(build_model("wrn-16-1", 10, synthetic.mean, synthetic.std), RT)
    (big,) = train(m, small, SGDConfig(epochs=1, lr=0.0, batch_size=32, max_grad_norm=1e-3), RT, seed=0)
    (never,) = train(m, small, SGDConfig(epochs=1, lr=0.0, batch_size=32, max_grad_norm=1e9), RT, seed=0)
    assert big["clipped"] == 1.0 and never["clipped"] == 0.0
    assert big["grad_norm"] == pytest.approx(never["grad_norm"], rel=0.05) and big["grad_norm"] > 1e-3
    with pytest.raises(ValueError, match="max_grad_norm"):
        SGDConfig(max_grad_norm=0.0)


def test_nan_loss_fails_the_run(synthetic):
    small = synthetic.train.subset(torch.arange(128))
    m = prepare(build_model("wrn-16-1", 10), RT)

    def bad_loss(model, x, y, idx):
        loss = model(x).sum() * float("nan")
        return loss, {}

    with pytest.raises(TrainingDiverged, match="loss is nan"):
        train(m, small, SGDConfig(epochs=1, batch_size=64), RT, seed=0, loss_fn=bad_loss)


def test_crop_flip_is_a_shifted_and_mirrored_copy():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, gen, pad=2)
    assert out.shape == x.shape
    # every output window is some crop of the padded image, possibly mirrored
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1))
                    for oy in range(5) for ox in range(5) for c in [padded[i, :, oy:oy + 8, ox:ox + 8]])
        assert found
    again = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)


def test_batches_cover_every_index_once():
    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    y = torch.arange(10)
    seen = torch.cat([idx for _, _, idx in batches(x, y, 3, generator=torch.Generator().manual_seed(0), shuffle=True)])
    assert sorted(seen.tolist()) == list(range(10))


def test_schedules():
    cos = SGDConfig(epochs=10, lr=0.1)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(5) == pytest.approx(0.05)
    nad = SGDConfig(epochs=20, lr=0.1, schedule="piecewise", milestones=(2, 20), lr_values=(0.01, 1e-4))
    assert [nad.lr_at(e) for e in (0, 1, 2, 19)] == [0.1, 0.1, 0.01, 0.01]
    step = SGDConfig(epochs=10, lr=1.0, schedule="multistep", milestones=(3, 6), gamma=0.5)
    assert [step.lr_at(e) for e in (2, 3, 6)] == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="schedule"):
        SGDConfig(schedule="linear")
    # linear warm-up over the first epochs, on top of any schedule
    warm = SGDConfig(epochs=20, lr=0.1, schedule="multistep", milestones=(3,), warmup_epochs=2)
    assert [warm.lr_at(e) for e in (0, 1, 2, 3)] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.01])
    assert SGDConfig(lr=0.1, warmup_epochs=None).lr_at(0) == SGDConfig(lr=0.1).lr_at(0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        SGDConfig(warmup_epochs=-1)


def test_asr_excludes_target_class_images():
    # 4 triggered images: two of the target class (0), two not. A model predicting the target
    # everywhere has ASR 100% on the non-target ones; counting target images would not change
    # that, so use a model that predicts target ONLY on the target-class images.
    true = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 0, 1, 2])
    asr, ra = asr_and_ra(pred, true, target=0)
    assert asr == 0.0 and ra == 1.0          # would be 50% if target-class images counted
    asr, ra = asr_and_ra(torch.tensor([0, 0, 0, 2]), true, target=0)
    assert asr == 0.5 and ra == 0.5


@pytest.mark.slow
def test_backdoor_metrics_filter_target_rows(synthetic, trained_clean):
    model, _ = trained_clean
    test = synthetic.test.subset(torch.arange(200))
    target = 3
    m_all = backdoor_metrics(model, test, test, target, RT)
    keep = test.y != target
    pred = model(test.x[keep].float() / 255).argmax(1)
    assert m_all["asr"] == pytest.approx((pred == target).float().mean().item(), abs=1e-6)


def test_der_formula():
    before, after = {"ba": 0.80, "asr": 1.0}, {"ba": 0.78, "asr": 0.02}
    assert der(before, after) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der({"ba": 0.8, "asr": 0.1}, {"ba": 0.9, "asr": 0.5}) == pytest.approx(0.5)


@pytest.mark.slow
def test_run_dir_roundtrip_and_weights_only(tmp_path, synthetic, trained_clean):
    model, _ = trained_clean
    spec = {"dataset": "synthetic", "model": model_spec("wrn-16-1", 10, synthetic.mean, synthetic.std)}
    write_run_dir(tmp_path / "out", model, spec, {"ba": 0.5})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "model.pt", "spec.json"]
    again = load_model(tmp_path / "out")
    x = synthetic.test.x[:8].float() / 255
    assert torch.allclose(again(x), model.eval()(x), atol=1e-5)
    assert not again.training
    # a pickle carrying code is refused, not executed
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    with open(tmp_path / "out" / "model.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "out")


def test_missing_spec_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path)
    (tmp_path / "spec.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
