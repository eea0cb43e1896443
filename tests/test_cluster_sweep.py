"""A reduced quickstart sweep, end to end through the CLI, on a real two-node Ray cluster whose
nodes are separate hosts on a private network and share no disk (``tests/cluster_harness.py``).
Three network namespaces made by the test, each with its own address on one bridge: ``srv``
(10.77.0.1: PostgreSQL for MLflow's store and Optuna's studies, an ``mlflow server`` with proxied
artifacts, a moto S3 server holding the sweep's storage), ``head`` (10.77.0.2: the Ray head, 1 CPU,
and the driver, as KubeRay runs it) and ``n2`` (10.77.0.3: a second Ray node, 1 CPU, in its own
mount namespace too, so that it cannot see the test's folders, the driver's work directory among
them). Every address lives inside those namespaces; nothing reaches the machine's own network.
Nothing is mocked: the driver is ``python -m sweep quickstart --address 10.77.0.2:... --tracking-uri
http://10.77.0.1:... --storage s3://... --optuna-storage postgresql+psycopg2://...`` as a subprocess.

* ``test_sweep_spreads_over_both_nodes_and_shares_only_through_s3_and_mlflow``: the sweep exits 0;
  its trials ran on both nodes (the ``ray_node_id`` tags of the trial runs are exactly the two
  nodes), and trials of two different Tuners overlapped in time (the Tuners run at once); every run of the sweep is FINISHED; every trial's ``model.pt`` downloads through the
  MLflow server and loads as a ``state_dict`` with ``weights_only=True``; the second node never
  saw the driver's folder, and the S3 bucket holds the attack stages' cache manifests and files
  (``run/cache/``), the Tune experiments with the trials' checkpoints
  (``run/sweeps/<id>/ray/``) and the sweep state's mirror; the nodes know the store's address only
  from ``--storage-endpoint`` (no ``AWS_ENDPOINT_URL``); ``report`` works from a fresh work
  directory holding only ``sweep.json`` (a laptop's, infra/README.md step 6).
* ``test_a_node_cut_off_mid_trial_is_retried_on_the_head_and_the_sweep_finishes``: a second sweep
  (its own work directory; the attack stages come from S3); the second node's link is taken down
  (``ip link set eth0 down`` in its namespace: its processes live on, unreachable, as a host
  whose network fails) while it runs a trial; the sweep still exits 0, every run is FINISHED (none RUNNING, no duplicate
  trial run: the lost trial's run is reattached), the lost trial is recovered (its run carries
  ``last_error``) and finishes on the head, and every trial that finished after the cut ran on
  the head.

The servers and the cluster start once per module; each sweep takes a few minutes on 2 shared CPU
cores (the second less: its attack stages are cached in S3).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import cluster_harness as ch  # after the environment above is set

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="the isolated node mounts tmpfs: needs root"),
    pytest.mark.skipif(not (ch.PG_BIN / "postgres").exists(), reason=f"no PostgreSQL server in {ch.PG_BIN}"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="no `ip` (iproute2) for the network namespaces"),
]

ROOT = Path(__file__).resolve().parents[1]
SWEEP_TIMEOUT = 1500          # seconds for one sweep on 2 shared cores (it takes a few minutes)
TIMEOUT = 120                 # seconds for any one remote call
# the GCS declares a node dead after 3 failed health checks 0.5 s apart (defaults: 3 s x 5)
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
PREFIX = "run"                # the sweep's storage: s3://<bucket>/run
# The quickstart (BadNets and Blend; NBA searched, FT at its paper default) cut to minutes: a
# smaller synthetic set, 3-epoch attack stages, 1-epoch defenses, 2 NBA trials per attack. FT
# runs its paper default only (one Tuner of fixed cases per attack); the four Tuners run at once
# and Ray fills the two 1-CPU nodes from all of them. 6 trials, 2 attack stages (one per node).
SETS = ["dataset=synthetic:1000:400", "budget.attack.epochs=3", "budget.defense_epochs=1",
        "budget.epoch_eval_size=200", "defenses.nba.params={teacher_epochs: 1, pgd_steps: 1, max_grad_norm: 5.0}",
        "defenses.ft.num_samples=1", "search.num_samples=2", "search.cross_check=false", "max_failures=2"]
N_TRIALS = 6                  # 2 FT paper defaults + 2 attacks x 2 NBA trials
N_STAGES = 2


@dataclass
class Cluster:
    root: Path
    net: ch.Network
    pg: ch.Postgres
    mlflow: ch.MlflowServer
    s3: ch.S3
    head: ch.RayHead
    node: ch.WorkerNode
    head_id: str


def s3_keys_only(s3: ch.S3) -> dict:
    return {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}


@pytest.fixture(scope="module")
def cluster():
    root = ch.make_root("bss-")
    net = ch.make_network(["srv", "head", "n2"])
    started = []
    try:
        with net.enter("srv"):
            pg, mlflow, s3 = ch.start_servers(root, started, host=net.address["srv"])
        # every node's workers reach S3 with the same credentials, and the store's address only from
        # the sweep's --storage-endpoint (no AWS_ENDPOINT_URL, as infra/ deploys them); each keeps
        # its node-local copy of the stored attack stages in a folder of its own (the head's: hidden
        # from node2 too)
        with net.enter("head"):
            head = ch.start_ray_head(root / "head", num_cpus=1, host=net.address["head"],
                                     env={**FAST_HEALTH_CHECK, **s3_keys_only(s3),
                                          "SWEEP_LOCAL_CACHE": str(root / "head" / "cache")})
        started.append(head)
        # the second node sees none of root: not the drivers' work dirs, the servers' data or the head's
        with net.enter("n2"):
            node = ch.start_isolated_worker_node(head.address, [root], num_cpus=1, head=head, node_dir=root / "n2",
                                                 host=net.address["n2"],
                                                 env={**s3_keys_only(s3), "SWEEP_LOCAL_CACHE": str(root / "n2" / "cache")})
        started.append(node)
        (root / "driver").mkdir()
        with net.enter("head"):
            head_id = _check_nodes(head, node, root / "driver")
        yield Cluster(root, net, pg, mlflow, s3, head, node, head_id)
    finally:
        if os.environ.get("CLUSTER_SWEEP_KEEP_LOGS"):    # keep the services', the sweeps' and Ray's logs
            keep = Path(os.environ["CLUSTER_SWEEP_KEEP_LOGS"]) / root.name
            try:
                shutil.copytree(root / "logs", keep / "logs", dirs_exist_ok=True)
                shutil.copytree(root / "head" / "ray", keep / "head-ray", dirs_exist_ok=True, symlinks=True,
                                ignore=shutil.ignore_patterns("*.sock", "sockets", "session_latest"))
            except (shutil.Error, OSError) as e:
                print(f"keeping the logs in {keep}: {e}")
        leftovers = ch.stop_all(started, root)
        net.delete()
        assert not leftovers, f"processes left after stop(): {leftovers}"


def _check_nodes(head: ch.RayHead, node: ch.WorkerNode, driver_dir: Path) -> str:
    """The head's node id, once both nodes are alive and node2 is shown blind to ``driver_dir``
    (the driver's files reach it only through S3) while the head sees it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    (driver_dir / "probe.txt").write_text("on the driver's disk only")
    with ch.ray_driver(head) as ray:
        alive = [n for n in ray.nodes() if n["Alive"]]
        head_id = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
        assert {n["NodeID"] for n in alive} == {head_id, node.node_id}, alive
        # each node on its own host's address
        assert {n["NodeManagerAddress"] for n in alive} == {head.address.split(":")[0], "10.77.0.3"}, alive

        @ray.remote(num_cpus=0)
        def sees(path):
            import os

            return os.path.exists(path)

        def on(node_id):
            return sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))

        probe = str(driver_dir / "probe.txt")
        assert ray.get(on(node.node_id).remote(probe), timeout=TIMEOUT) is False, "node2 sees the driver's folder"
        assert ray.get(on(head_id).remote(probe), timeout=TIMEOUT) is True
    (driver_dir / "probe.txt").unlink()
    return head_id


# ============================================================================ the driver

@dataclass
class Sweep:
    service: ch._Service
    workdir: Path

    @property
    def log(self) -> str:
        return self.service.log_path.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the CLI's output, Tune's tables left out, and every line
        that reports a failure."""
        lines = [ln for ln in self.log.splitlines() if ln.strip() and not ln.lstrip().startswith(tuple("│╭╰├"))]
        failures = [ln for ln in lines[:-n] if re.search(r"FAILED|error:|Error", ln)]
        return ("\n--- CLI output: failures ---\n" + "\n".join(failures[-20:]) if failures else "") + \
            f"\n--- CLI output (tail; {self.service.log_path}) ---\n" + "\n".join(lines[-n:])

    def wait(self, timeout: float = SWEEP_TIMEOUT) -> int:
        try:
            return self.service.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.service.stop()
            pytest.fail(f"the sweep did not end within {timeout} s{self.tail()}")

    def sweep_id(self) -> str:
        found = re.findall(r"^sweep (\S+): \d+ attack stage", self.log, re.M)
        assert len(found) == 1, f"no (or more than one) sweep id in the CLI output{self.tail()}"
        return found[0]


def start_sweep(c: Cluster, name: str) -> Sweep:
    """``python -m sweep quickstart`` joining the cluster from the head's host, in its own session
    (stopped with it)."""
    workdir = c.root / name
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SWEEP_STORAGE",
                        "SWEEP_OPTUNA_STORAGE", "SWEEP_WORKDIR", "SWEEP_LOCAL_CACHE", "SWEEP_CACHE_DIR")}
    env.pop("AWS_ENDPOINT_URL", None)
    env.update({**c.head.env, **s3_keys_only(c.s3), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "sweep", "quickstart", "--workdir", workdir, "--address", c.head.address,
           "--tracking-uri", c.mlflow.url, "--storage", f"s3://{c.s3.bucket}/{PREFIX}",
           "--storage-endpoint", c.s3.endpoint, "--optuna-storage", c.pg.optuna_uri]
    for s in SETS:
        cmd += ["--set", s]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with c.net.enter("head"):
        service = ch._Service(f"sweep-{name}", cmd, c.root / "logs" / f"sweep-{name}.log", env=env, cwd=str(workdir))
    return Sweep(service, workdir)


@pytest.fixture
def sweeps():
    """The sweeps a test starts: stopped (with every process of theirs) at its end."""
    started: list[Sweep] = []
    yield started
    for s in started:
        s.service.stop(grace=30)
        assert not s.service.processes(), f"the sweep driver left processes: {s.service.processes()}"


# ============================================================================ reading back

def sweep_runs(c: Cluster, sweep_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=c.mlflow.url)
    with c.net.enter("head"):   # the servers' subnet
        exp = client.get_experiment_by_name("quickstart")
        assert exp is not None, "no MLflow experiment 'quickstart' on the server"
        return client.search_runs([exp.experiment_id], filter_string=f"tags.sweep_id = '{sweep_id}'", max_results=1000)


def by_role(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags.get("role"), []).append(r)
    return out


def describe(runs) -> str:
    return "\n".join(f"  {r.info.run_name} {r.info.status} role={r.data.tags.get('role')} "
                     f"node={r.data.tags.get('ray_node_id')} error={r.data.tags.get('error', '')[:200]!r} "
                     f"last_error={r.data.tags.get('last_error', '')[:200]!r}" for r in runs)


def s3_keys(c: Cluster, prefix: str) -> list[str]:
    """The objects under ``prefix`` (not the empty folder markers pyarrow leaves)."""
    client = c.s3.client()
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        with c.net.enter("head"):
            page = client.list_objects_v2(Bucket=c.s3.bucket, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def overlapping_tuners(trials) -> set[tuple[str, str]]:
    """Pairs of Tuners (``pair`` tags) two of whose trials' runs were open at the same time."""
    spans = [(r.info.start_time, r.info.end_time, r.data.tags["pair"]) for r in trials]
    return {tuple(sorted((p, q))) for s, e, p in spans for s2, e2, q in spans if p != q and s < e2 and s2 < e}


def check_finished_sweep(c: Cluster, sweep: Sweep, rc: int):
    """rc 0, every run FINISHED, the expected runs: (sweep id, runs by role)."""
    assert rc == 0, f"the sweep exited {rc}{sweep.tail()}"
    sid = sweep.sweep_id()
    runs = sweep_runs(c, sid)
    roles = by_role(runs)
    not_finished = [r for r in runs if r.info.status != "FINISHED"]
    assert not not_finished, f"runs not FINISHED:\n{describe(not_finished)}{sweep.tail()}"
    assert len(roles.get("sweep", [])) == 1, describe(runs)
    assert len(roles.get("attack", [])) == N_STAGES, describe(runs)
    # one run per trial: a retried trial reattaches its run instead of opening another
    assert len(roles.get("defense", [])) == N_TRIALS, f"expected {N_TRIALS} trial runs:\n{describe(runs)}"
    assert len({r.data.tags["ray_trial_id"] for r in roles["defense"]}) == N_TRIALS
    for r in roles["defense"]:
        assert r.data.tags["fully_trained"] == "true", describe([r])
    return sid, roles


# ============================================================================ the tests

def test_sweep_spreads_over_both_nodes_and_shares_only_through_s3_and_mlflow(cluster, sweeps, tmp_path):
    import json

    import torch
    from mlflow import MlflowClient

    c = cluster
    sweep = start_sweep(c, "driver")
    sweeps.append(sweep)
    t0 = time.monotonic()
    rc = sweep.wait()
    print(f"\nsweep 1 (both nodes): {time.monotonic() - t0:.0f} s")
    sid, roles = check_finished_sweep(c, sweep, rc)
    trials = roles["defense"]

    # 1. the trials ran on both nodes
    nodes = {r.data.tags.get("ray_node_id") for r in trials}
    assert nodes == {c.head_id, c.node.node_id}, (
        f"trial nodes {nodes} != head {c.head_id} + node2 {c.node.node_id}:\n{describe(trials)}{sweep.tail()}")

    # 1b. the Tuners ran at once: trials of two different Tuners (pairs) overlapped in time
    # (one Tuner at a time, only trials of one Tuner could)
    overlaps = overlapping_tuners(trials)
    assert overlaps, f"no two Tuners' trials overlapped in time:\n{describe(trials)}{sweep.tail()}"
    print(f"overlapping Tuners: {sorted(overlaps)}")

    # 2. every trial's model, proxied by the server (never a path), loads as a state_dict
    client = MlflowClient(tracking_uri=c.mlflow.url)
    keys = None
    for r in trials:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri
        dst = tmp_path / r.info.run_id
        dst.mkdir()
        with c.net.enter("head"):
            local = client.download_artifacts(r.info.run_id, "model/model.pt", str(dst))
        state = torch.load(local, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state, f"{r.info.run_name}: model.pt is not a state_dict"
        assert all(isinstance(v, torch.Tensor) for v in state.values()), r.info.run_name
        assert keys is None or set(state) == keys, "the trials' models differ in their parameters"
        keys = set(state)
        assert any(torch.count_nonzero(v) for v in state.values() if v.is_floating_point())
    assert keys and any(k.endswith("weight") for k in keys)

    # 3. what the nodes shared went through S3: the attack stages (manifest last, naming a
    # complete writer folder), the Tune experiments with each trial's checkpoint, the sweep state
    hashes = {r.data.tags["attack_hash"] for r in roles["attack"]}
    assert len(hashes) == N_STAGES
    cache_keys = s3_keys(c, f"{PREFIX}/cache/")
    for h in hashes:
        manifest_key = f"{PREFIX}/cache/{h}/manifest.json"
        assert manifest_key in cache_keys, f"no cache manifest for stage {h} in S3: {cache_keys}"
        with c.net.enter("head"):
            body = c.s3.client().get_object(Bucket=c.s3.bucket, Key=manifest_key)["Body"].read()
        manifest = json.loads(body)
        stored = {k.rsplit("/", 1)[1] for k in cache_keys if k.startswith(f"{PREFIX}/cache/{h}/{manifest['folder']}/")}
        assert set(manifest["files"]) <= stored and "model.pt" in stored, (h, manifest, stored)
    # the stages finished: their epoch checkpoints were cleared
    assert not [k for k in cache_keys if "/.checkpoints/" in k], cache_keys
    ray_keys = s3_keys(c, f"{PREFIX}/sweeps/{sid}/ray/")
    assert ray_keys, f"no Tune experiment under s3://{c.s3.bucket}/{PREFIX}/sweeps/{sid}/ray/"
    tuners = {k.split("/")[4] for k in ray_keys}
    assert tuners == {"defaults__badnets", "defaults__blend", "badnets__nba", "blend__nba"}, tuners
    for t in tuners:
        assert any(re.search(rf"/ray/{t}/experiment_state-[^/]*\.json$", k) for k in ray_keys), (t, ray_keys)
    checkpoints = [k for k in ray_keys if re.search(r"/checkpoint_\d+/model\.pt$", k)]
    assert len(checkpoints) >= N_TRIALS, f"{len(checkpoints)} trial checkpoints in S3: {ray_keys}"
    assert f"{PREFIX}/sweeps/{sid}/sweep.json" in s3_keys(c, f"{PREFIX}/sweeps/{sid}/sweep.json")
    # and the driver's work dir holds the sweep's own files only on the driver's side
    assert (sweep.workdir / "sweeps" / sid / "sweep.json").is_file()
    assert (sweep.workdir / "sweeps" / sid / "report" / "best_configs.yaml").is_file(), sweep.tail()

    # 4. the report from another machine: a fresh work directory holding only the sweep's state
    # (as infra/README.md copies it to a laptop) and the tracking server
    laptop = tmp_path / "laptop"
    (laptop / "sweeps" / sid).mkdir(parents=True)
    shutil.copy(sweep.workdir / "sweeps" / sid / "sweep.json", laptop / "sweeps" / sid / "sweep.json")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SWEEP_WORKDIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with c.net.enter("head"):
        r = subprocess.run([sys.executable, "-m", "sweep", "report", "quickstart", "--workdir", str(laptop),
                            "--tracking-uri", c.mlflow.url], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sid in r.stdout and (laptop / "sweeps" / sid / "report" / "best_configs.yaml").is_file(), r.stdout[-2000:]


def test_the_dry_run_shows_how_the_sweep_packs_onto_the_cluster(cluster):
    """``--dry-run --address`` joins the cluster, reads its two 1-CPU nodes and says how the
    quickstart's trials pack onto them, starting nothing."""
    c = cluster
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({**c.head.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "sweep", "quickstart", "--dry-run", "--address", c.head.address]
    for s in SETS:
        cmd += ["--set", s]
    with c.net.enter("head"):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(c.root))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"cluster (the Ray cluster at {c.head.address}): 2 CPUs, 0 GPUs on 2 node(s)" in r.stdout, r.stdout[-2000:]
    assert "trial slots: 2 (a trial takes 1 CPU and 0 GPU)" in r.stdout
    assert "Tuners: 4, up to 4 at once" in r.stdout and "expected utilisation of the trial slots" in r.stdout


def _busy_trial_worker(node: ch.WorkerNode, seen: set) -> str | None:
    """The process title of a Ray worker of ``node`` running a Tune trial, if any (Ray names a
    busy worker ``ray::<actor>.<method>``; attack stages run as ``ray::attack-stage-...``);
    ``seen`` collects every ``ray::`` title met (for the failure message)."""
    import psutil

    for p in node.processes():
        try:
            title = " ".join(p.cmdline()).strip()
        except psutil.Error:
            continue
        if title.startswith("ray::"):
            seen.add(title)
            if ".train" in title:
                return title
    return None


def test_a_node_cut_off_mid_trial_is_retried_on_the_head_and_the_sweep_finishes(cluster, sweeps):
    c = cluster
    alive = c.node.service.popen.poll() is None
    assert alive, "node2 is not running"
    stored_before = [k for k in s3_keys(c, f"{PREFIX}/cache/") if k.endswith("/manifest.json")]
    sweep = start_sweep(c, "driver2")
    sweeps.append(sweep)
    t0 = time.monotonic()
    # wait until node2 runs a trial, then cut it off: its link goes down, its processes live on
    title, seen = None, set()
    while title is None:
        assert sweep.service.popen.poll() is None, \
            f"the sweep ended before node2 ran a trial (its workers: {sorted(seen)}){sweep.tail()}"
        assert time.monotonic() - t0 < SWEEP_TIMEOUT, f"node2 ran no trial (its workers: {sorted(seen)}){sweep.tail()}"
        title = _busy_trial_worker(c.node, seen)
        time.sleep(0.5)
    cut_ms = int(time.time() * 1000)
    c.net.cut("n2")
    print(f"\nnode2's link cut {time.monotonic() - t0:.0f} s into sweep 2, while running {title!r}")
    rc = sweep.wait()
    print(f"sweep 2 (node2 cut off): {time.monotonic() - t0:.0f} s")
    sid, roles = check_finished_sweep(c, sweep, rc)
    trials = roles["defense"]
    with c.net.enter("head"), ch.ray_driver(c.head) as ray:   # the GCS lost node2, as a host whose network failed
        assert {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(c.node.node_id) is False, ray.nodes()

    # the cut-off trial was recovered (Tune's on_trial_recover tags its run) and finished on the head
    recovered = [r for r in trials if r.data.tags.get("last_error")]
    assert recovered, f"no trial run was recovered after node2's loss:\n{describe(trials)}{sweep.tail()}"
    assert all(r.data.tags["ray_node_id"] == c.head_id for r in recovered), describe(recovered)
    # whatever finished after the cut ran on the head
    after = [r for r in trials if r.info.end_time > cut_ms]
    assert after and {r.data.tags["ray_node_id"] for r in after} == {c.head_id}, describe(trials)
    assert {r.data.tags["ray_node_id"] for r in trials} <= {c.head_id, c.node.node_id}
    if stored_before:   # the first sweep trained and stored the stages: this one only fetched them
        assert all(r.data.tags["cached"] == "true" for r in roles["attack"]), describe(roles["attack"])
