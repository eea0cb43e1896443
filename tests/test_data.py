"""Tests of trainables.data: the loaders, the image-folder cache, the synthetic set, clean subsets."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.data import (
    DataError,
    Dataset,
    check_dataset_name,
    clean_subset,
    describe_datasets,
    list_datasets,
    load_dataset,
)
from trainables.data import imagefolder as imagefolder_mod
from trainables.data.synthetic import CLASSES as SYNTHETIC_CLASSES

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    return load_dataset("synthetic", seed=0)


def test_synthetic_shapes_and_balance(synthetic):
    ds = synthetic
    assert ds.name == "synthetic"
    assert ds.classes == SYNTHETIC_CLASSES and ds.num_classes == 10
    assert ds.train.x.shape == (3000, 3, 32, 32) and ds.test.x.shape == (1000, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.y.bincount(minlength=10).tolist() == [300] * 10
    assert ds.test.y.bincount(minlength=10).tolist() == [100] * 10
    assert ds.image_size == 32
    assert all(0.1 < m < 0.9 for m in ds.mean) and all(0.05 < s < 0.5 for s in ds.std)


def test_synthetic_has_no_trigger_like_pixels(synthetic):
    x = torch.cat([synthetic.train.x, synthetic.test.x])
    # No pure white or black anywhere, so a pasted white/checker patch is always foreign.
    assert int(x.max()) <= 235 and int(x.min()) >= 8
    # The bottom-right 3x3 corner (where patch triggers go) is background, not a class cue.
    corner = x[:, :, 29:32, 29:32].float().mean(dim=(1, 2, 3))
    y = torch.cat([synthetic.train.y, synthetic.test.y])
    per_class = torch.stack([corner[y == c].mean() for c in range(10)])
    assert float(per_class.max() - per_class.min()) < 25


def test_synthetic_deterministic_per_seed():
    a = load_dataset("synthetic:200:100", seed=3)
    b = load_dataset("synthetic:200:100", seed=3)
    c = load_dataset("synthetic:200:100", seed=4)
    assert a.name == "synthetic:200:100" and len(a.train) == 200 and len(a.test) == 100
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.train.x, c.train.x)
    # The test split does not depend on the train size.
    d = load_dataset("synthetic:300:100", seed=3)
    assert torch.equal(a.test.x, d.test.x)


def test_synthetic_bad_names():
    for bad in ("synthetic:abc", "synthetic:5", "synthetic:100:5", "synthetic:1:2:3"):
        with pytest.raises(DataError, match="synthetic"):
            load_dataset(bad)


def _random_conv_features(x: torch.Tensor, mean, std) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 3, 5, 5, generator=g)
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    x = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h = F.relu(F.conv2d(x, w, padding=2, stride=2))
    return torch.cat([h.mean((2, 3)), h.amax((2, 3)), F.adaptive_max_pool2d(h, 2).flatten(1)], 1)


def test_synthetic_is_learnable_but_not_trivial(synthetic):
    """A random-conv-feature ridge probe reaches >= 40% (measured 57%; chance 10%), while
    nearest-centroid on raw pixels stays <= 45% (measured 25%): shape must be learnt."""
    ds = synthetic
    ftr = _random_conv_features(ds.train.x, ds.mean, ds.std)
    fte = _random_conv_features(ds.test.x, ds.mean, ds.std)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    a = torch.cat([(ftr - mu) / sd, torch.ones(len(ftr), 1)], 1).double()
    b = torch.cat([(fte - mu) / sd, torch.ones(len(fte), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=torch.float64), a.T @ F.one_hot(ds.train.y, 10).double())
    probe_acc = float(((b @ w).argmax(1) == ds.test.y).float().mean())

    centroids = torch.stack([ds.train.x[ds.train.y == c].float().mean(0) for c in range(10)]).flatten(1)
    nc_acc = float((torch.cdist(ds.test.x.float().flatten(1), centroids).argmin(1) == ds.test.y).float().mean())
    assert probe_acc >= 0.40, probe_acc
    assert nc_acc <= 0.45, nc_acc


# --------------------------------------------------------------------------------- imagefolder


def _write_image(path: Path, colour, size=(32, 32), fmt=None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


COLOURS = {"cat": (200, 30, 30), "ant": (30, 200, 30), "bee": (30, 30, 200)}


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for cls, colour in COLOURS.items():
        for i in range(4):
            _write_image(root / "train" / cls / f"{i:03d}.jpg", colour)
        _write_image(root / "test" / cls / "000.jpg", colour)
        _write_image(root / "test" / cls / "001.png", colour, size=(40, 48))  # resized to 32x32
    _write_image(root / "test" / "ant" / "002.bmp", COLOURS["ant"], size=(20, 20))  # PIL path
    (root / "train" / "ant" / "notes.txt").write_text("not an image, ignored")
    return root


def test_imagefolder_loads_and_caches(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is False
    assert ds.classes == ("ant", "bee", "cat")
    assert ds.name == f"imagefolder:{tree}"
    assert ds.train.x.shape == (12, 3, 32, 32) and ds.test.x.shape == (7, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.y.bincount().tolist() == [4, 4, 4] and ds.test.y.bincount().tolist() == [3, 2, 2]
    for split in (ds.train, ds.test):  # each image has its class's colour (JPEG within a few levels)
        for img, label in zip(split.x, split.y):
            want = torch.tensor(COLOURS[ds.classes[label]], dtype=torch.float32)
            assert (img.float().mean(dim=(1, 2)) - want).abs().max() < 8
    assert abs(ds.mean[0] - 260 / 3 / 255) < 0.03
    assert len(list(cache.glob("imagefolder-*.pt"))) == 1

    # Second load: served from the cache, without decoding anything.
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder_mod, "decode_files", no_decode)
    again = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is True
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)
    assert again.classes == ds.classes and again.mean == ds.mean and again.std == ds.std


def test_imagefolder_changed_file_invalidates_cache(tree, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    changed = tree / "train" / "cat" / "000.jpg"
    _write_image(changed, (250, 250, 0))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is False
    assert not torch.equal(first.train.x, second.train.x)
    # An added file is seen too.
    _write_image(tree / "train" / "bee" / "new.jpg", (30, 30, 200))
    third = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is False and len(third.train) == 13


def test_imagefolder_unreadable_cache_is_rebuilt(tree, tmp_path):
    cache = tmp_path / "cache"
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    (cache_file,) = cache.glob("imagefolder-*.pt")
    cache_file.write_bytes(b"garbage, not a torch file")
    ds = load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is False and len(ds.train) == 12
    load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    assert imagefolder_mod.last_load_info["cache_hit"] is True


def test_imagefolder_cache_dir_from_env(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "envcache"))
    load_dataset(f"imagefolder:{tree}")
    assert len(list((tmp_path / "envcache").glob("imagefolder-*.pt"))) == 1


def test_imagefolder_corrupt_image_names_file(tree, tmp_path):
    bad = tree / "train" / "bee" / "002.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated JPEG
    with pytest.raises(DataError, match="bee/002.jpg"):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="corrupt or undecodable image file: .*bee/002.jpg"):
        load_dataset(f"imagefolder:{tree}", cache_dir=tmp_path / "cache")


def test_imagefolder_bad_layouts(tree, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", cache_dir=cache)
    with pytest.raises(DataError, match="needs a folder"):
        load_dataset("imagefolder", cache_dir=cache)
    (tree / "test" / "cat" / "000.jpg").rename(tree / "test" / "000.jpg")
    (tree / "test" / "cat" / "001.png").unlink()
    (tree / "test" / "cat").rmdir()
    with pytest.raises(DataError, match=r"different class folders.*only in train: \['cat'\]"):
        load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    import shutil

    shutil.rmtree(tree / "test")
    with pytest.raises(DataError, match="no test/ subfolder"):
        load_dataset(f"imagefolder:{tree}", cache_dir=cache)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(f"imagefolder:{empty}", cache_dir=cache)


def test_imagefolder_cifar10_jpeg(tmp_path, cifar10_jpeg):
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    ds = load_dataset(f"imagefolder:{cifar10_jpeg}", cache_dir=cache)
    first = time.perf_counter() - t0
    assert imagefolder_mod.last_load_info["cache_hit"] is False
    t0 = time.perf_counter()
    cached = load_dataset(f"imagefolder:{cifar10_jpeg}", cache_dir=cache)
    second = time.perf_counter() - t0
    assert imagefolder_mod.last_load_info["cache_hit"] is True
    print(f"cifar10-jpeg: first load {first:.1f}s, cached load {second:.1f}s")

    assert ds.classes == CIFAR10_CLASSES and cached.classes == CIFAR10_CLASSES
    assert ds.train.x.shape == (50000, 3, 32, 32) and ds.test.x.shape == (10000, 3, 32, 32)
    assert ds.train.y.bincount().tolist() == [5000] * 10
    assert ds.test.y.bincount().tolist() == [1000] * 10
    assert torch.equal(cached.train.x, ds.train.x) and torch.equal(cached.test.y, ds.test.y)
    # Statistics close to CIFAR-10's canonical ones (JPEG smooths a little).
    for got, want in zip(ds.mean, (0.4914, 0.4822, 0.4465)):
        assert abs(got - want) < 0.005
    for got, want in zip(ds.std, (0.2470, 0.2435, 0.2616)):
        assert abs(got - want) < 0.01


# --------------------------------------------------------------------------- torchvision sets


def test_cifar10_missing_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("SWEEP_DATA_ROOT", raising=False)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=str(empty), download=False)
    msg = str(info.value)
    assert "cifar10" in msg and str(empty) in msg
    assert "SWEEP_DATA_ROOT" in msg and "--data-root" in msg and "imagefolder:<path>" in msg
    assert "Traceback" not in msg

    # Without root, SWEEP_DATA_ROOT is where it looks.
    monkeypatch.setenv("SWEEP_DATA_ROOT", str(tmp_path / "env-root"))
    with pytest.raises(DataError, match="env-root"):
        load_dataset("cifar100", download=False)


class _FakeCIFAR:
    """Stands in for torchvision.datasets.CIFAR10: missing until 'downloaded'."""

    network = False

    def __init__(self, root, train=True, download=False):
        if download and not self.network:
            raise OSError("<urlopen error [Errno -2] Name or service not known>")
        if not download:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        n = 20 if train else 10
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        self.classes = list(CIFAR10_CLASSES)


def test_cifar10_download_failure_and_conversion(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR)
    with pytest.raises(DataError, match="download failed.*Name or service not known"):
        load_dataset("cifar10", root=str(tmp_path), download=True)

    monkeypatch.setattr(_FakeCIFAR, "network", True)
    ds = load_dataset("cifar10", root=str(tmp_path), download=True)
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.test.y.dtype == torch.int64 and len(ds.test) == 10
    raw = _FakeCIFAR(tmp_path, train=True, download=True).data
    assert torch.equal(ds.train.x[3].permute(1, 2, 0), torch.from_numpy(raw[3]))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*cifar10.*synthetic"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="takes no ':' argument"):
        load_dataset("cifar10:/data")
    with pytest.raises(DataError):
        check_dataset_name("")
    assert check_dataset_name(" synthetic:100:20 ") == "synthetic:100:20"


def test_list_datasets():
    names = list_datasets()
    assert [n.split(":")[0].split("[")[0] for n in names] == ["cifar10", "cifar100", "gtsrb", "imagefolder", "synthetic"]
    assert all(describe_datasets()[n] for n in names)


def test_gtsrb_from_torchvision_layout(tmp_path, monkeypatch):
    """A tiny tree in torchvision's GTSRB layout: read with torchvision's class, resized, cached."""
    from PIL import Image

    base = tmp_path / "data" / "gtsrb"
    for label, colour in ((0, (200, 40, 40)), (1, (40, 40, 200))):
        for i, size in enumerate([(29, 30), (64, 57)]):
            path = base / "GTSRB" / "Training" / f"{label:05d}" / f"00000_{i:05d}.ppm"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(path, format="PPM")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate((1, 0, 1)):
        Image.new("RGB", (40, 41), (40, 40, 200) if label else (200, 40, 40)).save(test_dir / f"{i:05d}.ppm", format="PPM")
        rows.append(f"{i:05d}.ppm;40;41;5;5;35;36;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")

    ds = load_dataset("gtsrb", root=str(tmp_path / "data"), download=False, cache_dir=tmp_path / "cache")
    assert ds.num_classes == 43 and ds.classes[14] == "stop"
    assert ds.train.x.shape == (4, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 0, 1, 1] and ds.test.y.tolist() == [1, 0, 1]
    assert ds.test.x[1, 0].float().mean() > 190 and ds.test.x[0, 2].float().mean() > 190
    assert ds.mean == (0.3403, 0.3121, 0.3214)
    assert len(list((tmp_path / "cache").glob("gtsrb-*.pt"))) == 1
    from trainables.data import torchvision_sets

    monkeypatch.setattr(torchvision_sets, "decode_files", lambda *a, **k: pytest.fail("decoded despite the cache"))
    again = load_dataset("gtsrb", root=str(tmp_path / "data"), download=False, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train.x, ds.train.x)

    with pytest.raises(DataError, match="dataset 'gtsrb' not found.*SWEEP_DATA_ROOT"):
        load_dataset("gtsrb", root=str(tmp_path / "elsewhere"), download=False)


# ------------------------------------------------------------------------------- clean_subset


def test_clean_subset_size_and_stratification():
    labels = torch.arange(50000) % 10
    idx = clean_subset(labels, 0.05, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == 2500
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 2500
    assert labels[idx].bincount().tolist() == [250] * 10
    assert torch.equal(clean_subset(labels, 1.0, seed=5), torch.arange(50000))


def test_clean_subset_unbalanced_classes():
    labels = torch.tensor([0] * 100 + [1] * 300 + [2] * 600)
    idx = clean_subset(labels, 0.1, seed=1)
    assert labels[idx].bincount().tolist() == [10, 30, 60]


def test_clean_subset_deterministic():
    labels = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(0))
    a = clean_subset(labels, 0.1, seed=7)
    assert torch.equal(a, clean_subset(labels, 0.1, seed=7))
    assert not torch.equal(a, clean_subset(labels, 0.1, seed=8))


def test_clean_subset_exclusion():
    labels = torch.arange(10000) % 10
    poisoned = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:1000]
    idx = clean_subset(labels, 0.05, seed=0, exclude=poisoned)
    assert len(idx) == 500 and labels[idx].bincount().tolist() == [50] * 10
    assert not bool(torch.isin(idx, poisoned).any())
    mask = torch.zeros(10000, dtype=torch.bool)
    mask[poisoned] = True
    assert torch.equal(idx, clean_subset(labels, 0.05, seed=0, exclude=mask))
    # Nothing left to draw from in class 3 beyond what is not excluded.
    only = clean_subset(labels, 1.0, seed=0, exclude=poisoned)
    assert len(only) == 9000 and not bool(torch.isin(only, poisoned).any())


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_clean_subset_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
        clean_subset(torch.arange(100) % 10, fraction, seed=0)


def test_the_cost_estimate_counts_an_imagefolders_images(tree, tmp_path):
    """The dry run prices an ImageFolder dataset by its file counts (listed, not decoded)."""
    from sweep.planning import dataset_sizes

    assert dataset_sizes(f"imagefolder:{tree}") == (12, 7)
    assert dataset_sizes(f"imagefolder:{tmp_path / 'absent'}") is None      # unknown, not an error
