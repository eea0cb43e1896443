"""The content-addressed artifact cache: one build per hash, corrupt entries rebuilt, locks."""
import contextlib
import dataclasses
import threading

from trainables import artifacts
from trainables.artifacts import ArtifactCache, spec_hash, verify


def _writer(calls, payload=b"weights"):
    def build(tmp):
        calls.append(1)
        (tmp / "model.pt").write_bytes(payload)
        (tmp / "spec.json").write_text("{}")
    return build


def test_hash_is_order_independent():
    assert spec_hash({"a": 1, "b": [1, 2]}) == spec_hash({"b": [1, 2], "a": 1})
    assert spec_hash({"a": 1}) != spec_hash({"a": 2})


def test_options_that_are_off_do_not_change_a_stage_hash():
    """Adding an optional training feature (None = off) must not rename every cached stage."""
    from trainables.stages import resolve_attack_stage
    spec = resolve_attack_stage("synthetic", "wrn-16-1", "badnets", {}, {"epochs": 2})
    assert spec.train["max_grad_norm"] is None
    legacy = {k: v for k, v in spec.train.items() if k != "max_grad_norm"}
    assert spec.hash() == dataclasses.replace(spec, train=legacy).hash()
    clipped = resolve_attack_stage("synthetic", "wrn-16-1", "badnets", {}, {"epochs": 2, "max_grad_norm": 5.0})
    assert clipped.hash() != spec.hash()


def test_second_request_is_served_from_cache(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []
    p1, built1 = cache.get_or_build("h1", _writer(calls))
    p2, built2 = cache.get_or_build("h1", _writer(calls))
    assert (built1, built2) == (True, False) and len(calls) == 1 and p1 == p2
    assert verify(p1) and (p1 / "model.pt").read_bytes() == b"weights"


def test_corrupt_entry_is_rebuilt_not_loaded(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []
    path, _ = cache.get_or_build("h1", _writer(calls))
    (path / "model.pt").write_bytes(b"tampered")
    assert cache.lookup("h1") is None
    path2, built = cache.get_or_build("h1", _writer(calls))
    assert built and len(calls) == 2 and (path2 / "model.pt").read_bytes() == b"weights"
    # a half-written entry (no manifest) is also rebuilt
    (path2 / "manifest.json").unlink()
    assert cache.get_or_build("h1", _writer(calls))[1]


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path)

    def crash(tmp):
        (tmp / "model.pt").write_bytes(b"half")
        raise RuntimeError("killed")

    try:
        cache.get_or_build("h1", crash)
    except RuntimeError:
        pass
    assert cache.lookup("h1") is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".locks")] == []


def test_concurrent_requests_build_once(tmp_path, monkeypatch):
    """Four threads ask for the same missing entry. The build blocks until all four have reached
    the per-hash lock, so the other three wait on it while the entry is built (no timing luck),
    then find it there."""
    cache, calls = ArtifactCache(tmp_path), []
    at_lock = threading.Condition()
    arrived = []
    real_locked = artifacts._locked

    @contextlib.contextmanager
    def counted(lock_path):
        with at_lock:
            arrived.append(threading.get_ident())
            at_lock.notify_all()
        with real_locked(lock_path):
            yield

    monkeypatch.setattr(artifacts, "_locked", counted)

    def build(tmp):
        calls.append(1)
        with at_lock:     # the timeout only turns a broken lock into a failure instead of a hang
            assert at_lock.wait_for(lambda: len(arrived) == 4, timeout=60), arrived
        (tmp / "model.pt").write_bytes(b"w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build("h", build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(arrived) == 4
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False, False, False, True]


def test_per_epoch_evaluator_draws_its_triggered_subset_from_every_class():
    """The triggered test set comes in class order; the per-epoch subset is a seeded random draw
    of it (the first rows would measure the ASR on one class), the same draw for the same seed."""
    import torch

    from trainables.data import load_dataset
    from trainables.data.base import ImageSet
    from trainables.engine import pick_runtime
    from trainables.stages import Evaluator

    data = load_dataset("synthetic:100:1000")
    labels = torch.arange(9).repeat_interleave(100) + 1                   # 900 images, classes 1..9 in order
    triggered = ImageSet(torch.zeros(900, 3, 32, 32, dtype=torch.uint8), labels)
    ev = Evaluator(data, triggered, 0, pick_runtime("cpu"), subset=100, seed=0)
    assert len(ev.test) == 100 and len(ev.triggered) == 90
    assert len(set(ev.triggered.y.tolist())) >= 7
    again = Evaluator(data, triggered, 0, pick_runtime("cpu"), subset=100, seed=0)
    assert torch.equal(again.triggered.y, ev.triggered.y)
