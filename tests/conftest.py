"""Test tiers, and the shared fixtures: the synthetic dataset and one clean WRN-16-1 trained on it
(session scope, so a run trains it once).

Tiers, chosen by marker; CI runs every tier:

* unit (no marker): everything that needs neither Ray nor training beyond a few seconds. The
  default ``python -m pytest -q`` runs this tier only (under 5 minutes on 2 CPU cores).
* ``slow``: the method tier, every test that trains models beyond seconds: each test that uses
  ``trained_clean`` (directly or through a fixture built on it, e.g. the backdoored models), and
  the tests that train each attack and defense to its figure.
* ``ray``: tests that start a real Ray.
* ``cluster``: tests that need a multi-node Ray cluster.

The default run deselects ``slow``, ``ray`` and ``cluster``. An explicit ``-m`` expression
selects by itself (``-m slow``, ``-m ray``, ``-m "slow or ray"``, ``-m "not cluster"``);
``--all`` runs every tier, and ``--slow`` the unit and slow tiers.

The training tests must pass under either precision that ``trainables.engine.pick_runtime``
picks: bf16 autocast on CPUs with fast bf16 kernels (AVX-512 BF16 / AMX) and on CUDA, fp32
elsewhere; ``SWEEP_AMP=0`` / ``SWEEP_AMP=1`` force fp32 / bf16. Their bounds come from figures
measured under both.
"""
import os
from pathlib import Path

# Ray binds the external interface unless told otherwise; tests stay on 127.0.0.1
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

TIERS = {
    "slow": "the method tier: trains models beyond a few seconds (run with -m slow or --all)",
    "ray": "starts a real Ray (run with -m ray or --all)",
    "cluster": "needs a multi-node Ray cluster (run with -m cluster or --all)",
}
# Fixtures that train: a test requesting one (directly or through another fixture) belongs to
# the slow tier, and collection stops if it is not marked so.
TRAINING_FIXTURES = ("trained_clean",)


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run every test tier: unit, slow, ray and cluster")
    parser.addoption("--slow", action="store_true",
                     help="run the unit and slow tiers (not ray or cluster)")


def pytest_configure(config):
    for name, text in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    """Check the slow marks, then deselect the tiers the run did not ask for (the default run is
    the unit tier; ``-m`` selects by itself)."""
    unmarked = [item.nodeid for item in items
                if set(TRAINING_FIXTURES) & set(getattr(item, "fixturenames", ()))
                and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"these tests train (they use {', '.join(TRAINING_FIXTURES)}) but are not "
                                f"marked @pytest.mark.slow: {', '.join(unmarked)}")
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    skip = {"slow", "ray", "cluster"} - ({"slow"} if config.getoption("--slow") else set())
    deselected = [item for item in items if any(item.get_closest_marker(m) for m in skip)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        gone = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in gone]


@pytest.fixture(scope="session")
def cifar10_jpeg():
    """The CIFAR-10 JPEG copy (an ImageFolder tree: ``train/<class>/*``, ``test/<class>/*``) that
    ``SWEEP_TEST_CIFAR10`` names; a test that uses it skips when the variable is unset or the
    tree is missing."""
    value = os.environ.get("SWEEP_TEST_CIFAR10")
    if not value:
        pytest.skip("SWEEP_TEST_CIFAR10 is not set (the path of the CIFAR-10 JPEG copy)")
    root = Path(value)
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        pytest.skip(f"SWEEP_TEST_CIFAR10={value} has no train/ and test/ folders")
    return root


@pytest.fixture(scope="session")
def synthetic():
    from trainables.data import load_dataset
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def trained_clean(synthetic):
    """(WRN-16-1 trained 8 epochs on the synthetic set, its history)."""
    from trainables.engine import SGDConfig, pick_runtime, prepare, train
    from trainables.models import build_model

    rt = pick_runtime("cpu")
    torch.manual_seed(0)
    model = prepare(build_model("wrn-16-1", synthetic.num_classes, synthetic.mean, synthetic.std), rt)
    history = train(model, synthetic.train, SGDConfig(epochs=8, lr=0.1, batch_size=128), rt, seed=0)
    return model.eval(), history
