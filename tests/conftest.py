"""Shared fixtures: the synthetic dataset and one clean WRN-16-1 trained on it (session scope,
so the suite trains it once)."""
import os

# Ray binds the external interface unless told otherwise; tests stay on 127.0.0.1
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tier: the training-heavy tests of each method's figures")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier (training-heavy); run with --slow or -m slow")


def pytest_collection_modifyitems(config, items):
    """The default run is the fast tier (< 10 min on 2 cores); ``--slow`` adds the slow tier and
    an explicit ``-m`` expression selects by itself. CI runs both tiers."""
    if config.getoption("--slow") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


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
