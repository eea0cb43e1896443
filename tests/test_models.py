"""The model zoo honours the one model contract (``trainables/models/base.py``) for every name."""
from __future__ import annotations

import functools
import io
import re

import pytest
import torch

import trainables.models as zoo
from trainables.models import TapModel, build_model, list_models, model_summary

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
NUM_CLASSES = 7  # not 10, so a hard-coded class count shows up


def documented_taps() -> dict[str, list[tuple[int, int, int]]]:
    """The tap-shape table in the package docstring: name -> [(C, H, W), ...]."""
    table = {}
    for line in zoo.__doc__.splitlines():
        match = re.match(r"^(\S+)\s+(\d+x\d+x\d+(?:, \d+x\d+x\d+)*)\s", line)
        if match:
            shapes = [tuple(int(v) for v in s.split("x")) for s in match.group(2).split(", ")]
            table[match.group(1)] = shapes
    return table


@functools.lru_cache(maxsize=None)
def model(name: str) -> TapModel:
    torch.manual_seed(0)
    return build_model(name, NUM_CLASSES, MEAN, STD).eval()


def pixels(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float rounding, relative to the tensor's scale (deep untrained nets reach 1e4)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= rel * a.abs().max() + 1e-6)


NAMES = list_models()


def test_table_documents_exactly_the_registered_models():
    assert sorted(documented_taps()) == sorted(NAMES)
    assert zoo.DEFAULT_MODEL == "wrn-16-1" and NAMES[0] == "wrn-16-1"


@pytest.mark.parametrize("name", NAMES)
def test_features_match_documented_shapes(name):
    net = model(name)
    x = pixels()
    with torch.no_grad():
        taps, logits = net.features(x)
    assert [tuple(t.shape) for t in taps] == [(2, *s) for s in documented_taps()[name]]
    assert logits.shape == (2, NUM_CLASSES) and net.num_classes == NUM_CLASSES
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_forward_penultimate_and_taps_agree(name):
    net = model(name)
    x = pixels()
    with torch.no_grad():
        taps, logits = net.features(x)
        assert close(net(x), logits)
        assert close(net.fc(net.penultimate(x)), logits)
        # each group reads the previous tap, and nothing downstream overwrote a tap in place
        for i in range(1, len(taps)):
            assert close(net.groups[i](taps[i - 1]), taps[i])
        pooled = torch.flatten(net.pool(net.final(taps[-1])), 1)
        assert close(net.fc(pooled), logits)


@pytest.mark.parametrize("name", NAMES)
def test_normalisation_is_the_first_layer(name):
    net = model(name)
    assert next(iter(net.children())) is net.normalize
    seen = []
    handle = net.stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            net(torch.tensor(MEAN).view(1, 3, 1, 1).expand(2, 3, 32, 32))  # pixels equal to the mean
    finally:
        handle.remove()
    assert torch.allclose(seen[0], torch.zeros(2, 3, 32, 32), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_gives_the_same_outputs(name):
    net = model(name)
    x = pixels()
    with torch.no_grad():
        taps, logits = net.features(x)
        net.to(memory_format=torch.channels_last)
        try:
            taps_cl, logits_cl = net.features(x.contiguous(memory_format=torch.channels_last))
        finally:
            net.to(memory_format=torch.contiguous_format)
    assert close(logits_cl, logits, rel=1e-4)
    assert all(close(a, b, rel=1e-4) for a, b in zip(taps_cl, taps))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_into_a_fresh_model(name):
    net = model(name)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different initialisation
    fresh = build_model(name, NUM_CLASSES, MEAN, STD).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys and shapes
    x = pixels()
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_trains(name):
    torch.manual_seed(0)
    net = build_model(name, NUM_CLASSES, MEAN, STD).train()
    taps, logits = net.features(pixels())
    (logits.sum() + sum(t.mean() for t in taps)).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_wrn_16_1_is_nads_small_victim():
    net = model("wrn-16-1")
    params = sum(p.numel() for p in build_model("wrn-16-1", 10).parameters())
    assert abs(params - 175_000) / 175_000 < 0.03, params
    assert [len(g) for g in net.groups] == [2, 2, 2]
    assert isinstance(net.final[0], torch.nn.BatchNorm2d)  # final BN-ReLU, after the taps
    block = net.groups[1][0]
    assert block.shortcut is not None and block.shortcut.kernel_size == (1, 1)
    assert net.groups[0][0].shortcut is None  # 16 -> 16: identity shortcut


def test_any_valid_wrn_name_is_parsed():
    net = build_model("WRN-10-3", 5)
    assert [len(g) for g in net.groups] == [1, 1, 1]
    with torch.no_grad():
        taps, logits = net.features(pixels())
    assert [t.shape[1] for t in taps] == [48, 96, 192] and logits.shape == (2, 5)
    with pytest.raises(ValueError, match="wrn-17-1"):
        build_model("wrn-17-1", 10)


def test_unknown_name_raises_value_error_naming_it():
    with pytest.raises(ValueError) as info:
        build_model("resnet-9000", 10)
    message = str(info.value)
    assert "resnet-9000" in message and "wrn-16-1" in message and "densenet121" in message


@pytest.mark.parametrize("name", ["wrn-16-1", "vgg16-bn"])
def test_model_summary_is_one_line_with_the_taps(name):
    line = model_summary(name)
    assert "\n" not in line and line.startswith(name)
    assert ", ".join("x".join(map(str, s)) for s in documented_taps()[name]) in line
