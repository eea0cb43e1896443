"""The shared storage layer (local folders and S3 through pyarrow.fs) and the artifact cache over it,
against a real S3 API: a moto server on 127.0.0.1 (one per session)."""
import json
import logging
import socket
import threading
import time
import uuid

import pytest

from trainables.artifacts import ArtifactCache, cache_for, verify
from trainables.storage import Storage, StorageError, open_storage

BUCKET = "sweep-shared"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A fresh prefix in the moto bucket, with fake credentials in the environment."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return open_storage(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}/", endpoint=moto_endpoint)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "shared")
    return request.getfixturevalue("s3")


# ---------------------------------------------------------------- URIs


def test_uris_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert open_storage("rel/dir/").uri == str(tmp_path / "rel" / "dir")
    assert open_storage(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    s = open_storage("s3://bkt/a/b/", endpoint="http://127.0.0.1:9000/")
    assert (s.uri, s.endpoint, s.is_local) == ("s3://bkt/a/b", "http://127.0.0.1:9000", False)
    assert s.url("c/d.txt") == "s3://bkt/a/b/c/d.txt" and s.url("") == "s3://bkt/a/b"
    assert open_storage("s3://bkt").url("k") == "s3://bkt/k"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000")
    assert open_storage("s3://bkt/p").endpoint == "http://10.0.0.5:9000"
    assert open_storage("s3://bkt/p") == Storage("s3://bkt/p/", "http://10.0.0.5:9000")


@pytest.mark.parametrize("uri, words", [
    ("gs://bkt/p", ["'gs'", "gs://bkt/p"]),
    ("hdfs://nn/x", ["'hdfs'"]),
    ("s3:///nobucket", ["no bucket"]),
    ("file://otherhost/x", ["otherhost"]),
    ("", ["empty"]),
])
def test_bad_uris_are_refused(uri, words):
    with pytest.raises(StorageError) as e:
        open_storage(uri)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_keys_and_endpoints_are_refused(tmp_path):
    with pytest.raises(StorageError, match="ftp://h"):
        open_storage("s3://bkt/p", endpoint="ftp://h")
    with pytest.raises(StorageError, match="local storage"):
        open_storage(tmp_path, endpoint="http://127.0.0.1:9000")
    with pytest.raises(StorageError, match=r"\.\."):
        open_storage(tmp_path).url("a/../../etc")
    with pytest.raises(StorageError, match="root"):
        open_storage(tmp_path).delete("")


# ---------------------------------------------------------------- round trips


def test_bytes_round_trip(storage):
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", b"\x00\x01payload")
    storage.write_text("a/c.txt", "first")
    storage.write_text("a/c.txt", "second")                       # overwrite
    assert storage.read_bytes("a/b.bin") == b"\x00\x01payload" and storage.read_text("a/c.txt") == "second"
    assert storage.exists("a/b.bin") and storage.exists("a")
    assert storage.list_files("a") == ["b.bin", "c.txt"]
    with pytest.raises(FileNotFoundError, match=storage.url("a/missing")):
        storage.read_bytes("a/missing")
    storage.delete("a/b.bin")
    assert storage.list_files("a") == ["c.txt"]
    storage.delete("a")
    storage.delete("a")                                           # missing: fine
    assert not storage.exists("a") and storage.list_files("a") == []


def test_dir_round_trip(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    blobs = {"top.pt": b"w" * 100_000, "sub/x.json": b"{}", "sub/deeper/y.txt": b"y"}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    assert storage.upload_dir(src, "run/1") == sorted(blobs)
    assert storage.list_files("run") == sorted(f"1/{n}" for n in blobs)
    dst = tmp_path / "dst"
    assert storage.download_dir("run/1", dst) == sorted(blobs)
    assert {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == blobs
    with pytest.raises(FileNotFoundError):
        storage.download_dir("run/nothing", tmp_path / "none")
    storage.upload_file(src / "top.pt", "single/top.pt")
    storage.download_file("single/top.pt", tmp_path / "got" / "top.pt")
    assert (tmp_path / "got" / "top.pt").read_bytes() == blobs["top.pt"]


def test_storage_pickles_without_its_filesystem(s3):
    import pickle
    s3.write_text("k", "v")
    assert "_fs" in vars(s3)                                      # built and cached by the write
    clone = pickle.loads(pickle.dumps(s3))
    assert clone == s3 and "_fs" not in vars(clone) and clone.read_text("k") == "v"


# ---------------------------------------------------------------- check()


def test_check_local_creates_the_folder_or_says_why(tmp_path):
    open_storage(tmp_path / "new" / "dir").check()
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match=str(tmp_path / "afile" / "sub")):
        open_storage(tmp_path / "afile" / "sub").check()


def test_check_passes_on_a_good_bucket(s3):
    s3.check()
    assert s3.list_files() == []                                   # the probe is cleaned up


def test_check_missing_bucket(s3, moto_endpoint):
    bad = open_storage("s3://no-such-bucket-here/p", moto_endpoint)
    with pytest.raises(StorageError, match="no-such-bucket-here") as e:
        bad.check()
    assert "does not exist" in str(e.value)


def test_check_dead_endpoint_fails_fast(s3):
    dead = f"http://127.0.0.1:{_free_port()}"                    # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as e:
        open_storage(f"s3://{BUCKET}/p", dead).check()
    assert time.monotonic() - t0 < 10
    assert f"s3://{BUCKET}/p" in str(e.value) and dead in str(e.value)


def test_check_rejected_credentials(s3, monkeypatch):
    import moto.settings
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)   # moto now checks keys
    with pytest.raises(StorageError, match="credentials") as e:
        open_storage(s3.uri, s3.endpoint).check()
    assert s3.uri in str(e.value)


# ---------------------------------------------------------------- the cache over storage


def _builder(calls, payload=b"weights"):
    def build(tmp):
        calls.append(1)
        (tmp / "model.pt").write_bytes(payload)
        (tmp / "spec.json").write_text('{"a": 1}')
    return build


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_second_node_fetches_instead_of_building(storage, tmp_path):
    calls, quiet = [], lambda msg: None
    node_a = ArtifactCache(tmp_path / "a", storage)
    path_a, built = node_a.get_or_build("h1", _builder(calls), quiet)
    assert built and calls == [1]
    manifest = json.loads(storage.read_text("cache/h1/manifest.json"))
    assert set(manifest["files"]) == {"model.pt", "spec.json"}
    assert storage.list_files(f"cache/h1/{manifest['folder']}") == ["model.pt", "spec.json"]

    node_b = ArtifactCache(tmp_path / "b", storage)
    assert node_b.path("h1").exists() is False
    path_b, built = node_b.get_or_build("h1", _builder(calls), quiet)
    assert not built and calls == [1] and path_b == tmp_path / "b" / "h1"
    assert verify(path_b) and _files(path_b) == _files(path_a)
    # lookup() alone fetches too (node C), and a later request on B is a local hit
    assert cache_for(tmp_path / "c", storage.uri, storage.endpoint).lookup("h1", quiet) == tmp_path / "c" / "h1"
    assert node_b.get_or_build("h1", _builder(calls), quiet) == (path_b, False) and calls == [1]


def test_a_node_copy_missing_from_the_storage_is_published(storage, tmp_path):
    """A node's copy left from another storage (or one since emptied): the other nodes read the
    storage, so a hit on this node publishes the entry there first (lookup and get_or_build)."""
    quiet, calls = (lambda m: None), []
    ArtifactCache(tmp_path / "node", None).get_or_build("h1", _builder(calls), quiet)
    msgs = []
    assert ArtifactCache(tmp_path / "node", storage).lookup("h1", msgs.append) == tmp_path / "node" / "h1"
    assert any("publishing" in m for m in msgs)
    path, built = ArtifactCache(tmp_path / "other", storage).get_or_build("h1", _builder(calls), quiet)
    assert not built and calls == [1] and _files(path) == _files(tmp_path / "node" / "h1")
    ArtifactCache(tmp_path / "node", None).get_or_build("h2", _builder(calls), quiet)
    assert ArtifactCache(tmp_path / "node", storage).get_or_build("h2", _builder(calls), quiet)[1] is False
    assert ArtifactCache(tmp_path / "third", storage).lookup("h2", quiet) is not None and calls == [1, 1]


def test_local_only_cache_writes_nothing_remote(s3, tmp_path):
    cache = cache_for(tmp_path / "a", None)
    assert cache.remote is None
    cache.get_or_build("h1", _builder([]), lambda m: None)
    assert s3.list_files() == []


def test_tampered_remote_file_is_not_loaded(s3, tmp_path):
    calls, msgs = [], []
    ArtifactCache(tmp_path / "a", s3).get_or_build("h1", _builder(calls), msgs.append)
    folder = json.loads(s3.read_text("cache/h1/manifest.json"))["folder"]
    s3.write_bytes(f"cache/h1/{folder}/model.pt", b"tampered")

    node_b = ArtifactCache(tmp_path / "b", s3)
    assert node_b.lookup("h1", msgs.append) is None
    assert not (tmp_path / "b" / "h1").exists()
    path, built = node_b.get_or_build("h1", _builder(calls), msgs.append)
    assert built and calls == [1, 1] and (path / "model.pt").read_bytes() == b"weights"
    assert any("does not match" in m for m in msgs)
    # republished: a third node now fetches a good entry
    assert ArtifactCache(tmp_path / "c", s3).get_or_build("h1", _builder(calls), msgs.append)[1] is False
    assert calls == [1, 1]


def test_a_failed_publish_keeps_the_local_entry(s3, tmp_path):
    msgs = []
    gone = open_storage("s3://no-such-bucket-here/p", s3.endpoint)
    path, built = ArtifactCache(tmp_path / "a", gone).get_or_build("h1", _builder([]), msgs.append)
    assert built and verify(path) and any("could not publish" in m for m in msgs)


def test_files_without_manifest_count_as_absent(s3, tmp_path):
    s3.write_bytes("cache/h1/deadbeef/model.pt", b"weights")          # a writer died before its manifest
    calls = []
    node = ArtifactCache(tmp_path / "a", s3)
    assert node.lookup("h1", lambda m: None) is None
    assert node.get_or_build("h1", _builder(calls), lambda m: None)[1] and calls == [1]


def test_manifest_naming_a_missing_folder_counts_as_absent(s3, tmp_path):
    s3.write_text("cache/h1/manifest.json", json.dumps({"files": {"model.pt": "0" * 64}, "folder": "gone"}))
    assert ArtifactCache(tmp_path / "a", s3).lookup("h1", lambda m: None) is None
    s3.write_text("cache/h2/manifest.json", "{not json")
    assert ArtifactCache(tmp_path / "a", s3).lookup("h2", lambda m: None) is None


def test_manifest_is_written_after_the_files(s3, tmp_path, monkeypatch):
    order = []
    real_upload, real_write = Storage.upload_file, Storage.write_bytes

    def upload(self, local, rel):
        order.append(rel)
        real_upload(self, local, rel)

    def write(self, rel, data):
        order.append(rel)
        real_write(self, rel, data)

    monkeypatch.setattr(Storage, "upload_file", upload)
    monkeypatch.setattr(Storage, "write_bytes", write)
    ArtifactCache(tmp_path / "a", s3).get_or_build("h1", _builder([]), lambda m: None)
    assert order[-1] == "cache/h1/manifest.json" and len(order) == 3
    folder = json.loads(s3.read_text("cache/h1/manifest.json"))["folder"]
    assert sorted(order[:-1]) == [f"cache/h1/{folder}/model.pt", f"cache/h1/{folder}/spec.json"]


def test_two_writers_on_different_nodes_leave_a_consistent_entry(s3, tmp_path):
    """Two nodes (own local roots, so no shared lock) build the same hash at once, with different
    bytes; whichever manifest lands last, it names a complete folder that verifies."""
    both_building = threading.Barrier(2, timeout=30)

    def builder(payload):
        def build(tmp):
            both_building.wait()                      # both missed the remote entry
            (tmp / "model.pt").write_bytes(payload)
        return build

    results = {}
    threads = [threading.Thread(target=lambda n=n: results.update(
        {n: ArtifactCache(tmp_path / n, s3).get_or_build("h1", builder(n.encode() * 1000), lambda m: None)}))
        for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {built for _, built in results.values()} == {True}
    manifest = json.loads(s3.read_text("cache/h1/manifest.json"))
    folders = {f.split("/")[0] for f in s3.list_files("cache/h1") if "/" in f}
    assert len(folders) == 2 and manifest["folder"] in folders       # both folders complete, one named
    for folder in folders:
        assert s3.list_files(f"cache/h1/{folder}") == ["model.pt"]
    path_c, built = ArtifactCache(tmp_path / "c", s3).get_or_build("h1", builder(b"x"), lambda m: None)
    assert not built and verify(path_c)
    assert (path_c / "model.pt").read_bytes() in (b"a" * 1000, b"b" * 1000)


# ---------------------------------------------------------------- Ray Tune on the same storage


@pytest.mark.ray
def test_tune_checkpoints_land_in_s3(s3, monkeypatch):
    """RunConfig(storage_path=<bucket/path, no scheme>, storage_filesystem=<our S3 fs>) against a
    custom endpoint: a real Tuner run reports one metric and a checkpoint, which ends up in S3."""
    import ray
    from ray import tune

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    def trainable(config):
        import os
        import tempfile
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "weights.txt"), "w") as f:
            f.write(f"x={config['x']}")
        tune.report({"score": config["x"] * 2}, checkpoint=tune.Checkpoint.from_directory(d))

    storage_path, fs = s3.tune_storage("ray")
    assert not storage_path.startswith("s3://") and fs is not None
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        results = tune.Tuner(
            trainable, param_space={"x": 3},
            run_config=tune.RunConfig(name="exp", storage_path=storage_path, storage_filesystem=fs),
        ).fit()
    finally:
        ray.shutdown()
    assert not results.errors and results[0].metrics["score"] == 6
    files = s3.list_files("ray/exp")
    weights = [f for f in files if f.endswith("/weights.txt") and "/checkpoint_" in f]
    assert len(weights) == 1, files
    assert s3.read_text(f"ray/exp/{weights[0]}") == "x=3"
    assert results[0].checkpoint.path.startswith(f"{storage_path}/exp/")
