"""Self-tests of the multi-node harness (``tests/cluster_harness.py``): real PostgreSQL, a real
MLflow server on it with proxied artifacts, a real moto S3 server, a Ray head and a second Ray node
in its own mount namespace that cannot see the driver's folders. Each test would fail if the
isolation or a server were fake: the second node must not see a file the driver wrote, yet must
reach S3, MLflow and Postgres over the network; a killed node must turn dead in the GCS; every
listening socket of every process started must be on 127.0.0.1.

The servers start once per module (about 30 s on 2 cores).
"""
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, before ray loads

import cluster_harness as ch  # after the environment above is set

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="the isolated node mounts tmpfs: needs root"),
    pytest.mark.skipif(not (ch.PG_BIN / "postgres").exists(), reason=f"no PostgreSQL server in {ch.PG_BIN}"),
]

TIMEOUT = 120   # seconds for any one remote call
# the GCS declares a node dead after 3 failed health checks 0.5 s apart (defaults: 3 s x 5)
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Cluster:
    root: Path
    driver_dir: Path
    pg: ch.Postgres
    mlflow: ch.MlflowServer
    s3: ch.S3
    head: ch.RayHead
    node: ch.WorkerNode

    def handles(self):
        return [self.pg, self.mlflow, self.s3, self.head, self.node]


@pytest.fixture(scope="module")
def cluster():
    root = ch.make_root()
    started = []
    try:
        pg, mlflow, s3 = ch.start_servers(root, started)
        head = ch.start_ray_head(root / "head", num_cpus=1, env=FAST_HEALTH_CHECK)
        started.append(head)
        driver_dir = root / "driver"
        driver_dir.mkdir()
        # the second node sees none of root: not the driver's folder, the servers' data or the head
        node = ch.start_isolated_worker_node(head.address, [root], num_cpus=1, resources={"node2": 1},
                                             env=s3.env, head=head, node_dir=root / "n2")
        started.append(node)
        yield Cluster(root, driver_dir, pg, mlflow, s3, head, node)
    finally:
        leftovers = ch.stop_all(started, root)
        assert not leftovers, f"processes left after stop(): {leftovers}"


@pytest.fixture(scope="module")
def ray(cluster):
    with ch.ray_driver(cluster.head) as ray:
        yield ray


def on(node_id):
    """Options pinning a task to one node (hard affinity: fails rather than run elsewhere)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def head_id(ray):
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


# ============================================================================ the nodes

def test_two_alive_nodes_and_the_second_has_its_resource(cluster, ray):
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    assert cluster.node.node_id in alive and alive[cluster.node.node_id]["Resources"].get("node2") == 1
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in alive.values())

    @ray.remote(num_cpus=0, resources={"node2": 0.01})
    def where():
        import ray as r

        return r.get_runtime_context().get_node_id()

    assert ray.get(where.remote(), timeout=TIMEOUT) == cluster.node.node_id


def test_second_node_cannot_see_the_driver_files_yet_shares_s3(cluster, ray):
    secret = cluster.driver_dir / "secret.txt"
    secret.write_text("only on the driver's disk")
    key = f"from-node2/{uuid.uuid4().hex}.txt"

    @ray.remote(num_cpus=0)
    def look_and_upload(path, root, bucket, key):
        import os

        import boto3
        import ray as r

        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"written on node2")
        mine = os.path.join(os.getcwd(), "node2-only.txt")
        with open(mine, "w") as f:
            f.write("only on node2's disk")
        return {"node": r.get_runtime_context().get_node_id(), "sees": os.path.exists(path),
                "root": sorted(os.listdir(root)), "mine": mine}

    got = ray.get(look_and_upload.options(**on(cluster.node.node_id)).remote(
        str(secret), str(cluster.root), cluster.s3.bucket, key), timeout=TIMEOUT)
    assert got["node"] == cluster.node.node_id
    assert got["sees"] is False
    assert "driver" not in got["root"] and "postgres" not in got["root"]   # a tmpfs over the root
    assert not Path(got["mine"]).exists()   # and the driver cannot see the node's files

    # the control: a task on the head does see the driver's file
    @ray.remote(num_cpus=0)
    def sees(path):
        import os

        return os.path.exists(path)

    assert ray.get(sees.options(**on(head_id(ray))).remote(str(secret)), timeout=TIMEOUT) is True
    body = cluster.s3.client().get_object(Bucket=cluster.s3.bucket, Key=key)["Body"].read()
    assert body == b"written on node2"


def test_second_node_logs_a_run_with_an_artifact_the_driver_downloads_through_the_server(cluster, ray, tmp_path):
    from mlflow import MlflowClient

    @ray.remote(num_cpus=0)
    def log_run(url, artifacts_dir):
        import os

        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=url)
        exp = c.get_experiment_by_name("harness")
        exp_id = exp.experiment_id if exp else c.create_experiment("harness")
        run = c.create_run(exp_id, run_name="on-node2")
        c.log_param(run.info.run_id, "where", "node2")
        c.log_metric(run.info.run_id, "acc", 0.75)
        with open("note.txt", "w") as f:
            f.write("artifact from node2")
        c.log_artifact(run.info.run_id, os.path.abspath("note.txt"), "notes")
        c.set_terminated(run.info.run_id)
        return run.info.run_id, os.path.exists(artifacts_dir)

    run_id, node_sees_store = ray.get(log_run.options(**on(cluster.node.node_id)).remote(
        cluster.mlflow.url, str(cluster.mlflow.artifacts_dir)), timeout=TIMEOUT)
    assert node_sees_store is False

    c = MlflowClient(tracking_uri=cluster.mlflow.url)
    run = c.get_run(run_id)
    assert run.data.params == {"where": "node2"} and run.data.metrics == {"acc": 0.75}
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")   # proxied, not a path
    local = c.download_artifacts(run_id, "notes/note.txt", str(tmp_path))
    assert Path(local).read_text() == "artifact from node2"
    # it lives in the server's artifact store, and the run in Postgres
    assert [p.read_text() for p in cluster.mlflow.artifacts_dir.rglob("note.txt")] == ["artifact from node2"]
    import psycopg2

    with psycopg2.connect(cluster.pg.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)


def test_an_optuna_study_in_postgres_is_shared_by_both_nodes(cluster, ray):
    import optuna

    name = f"harness-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=cluster.pg.optuna_uri, direction="minimize")

    @ray.remote(num_cpus=0)
    def optimize(storage, name):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=name, storage=storage)
        study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=3)
        return len(study.trials)

    assert ray.get(optimize.options(**on(cluster.node.node_id)).remote(cluster.pg.optuna_uri, name),
                   timeout=TIMEOUT) == 3
    study = optuna.load_study(study_name=name, storage=cluster.pg.optuna_uri)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


# ============================================================================ loopback only

def test_every_listening_socket_of_every_started_process_is_on_127_0_0_1(cluster, ray):
    import psutil

    sockets = {type(h).__name__: ch.listening_sockets(h.processes()) for h in cluster.handles()}
    sockets["driver"] = ch.listening_sockets([psutil.Process()])
    ports = {name: {port for _, _, _, port in socks} for name, socks in sockets.items()}
    # each service is found listening where its handle says (the check is not vacuous)
    assert cluster.pg.port in ports["Postgres"]
    assert int(cluster.mlflow.url.rsplit(":", 1)[1]) in ports["MlflowServer"]
    assert int(cluster.s3.endpoint.rsplit(":", 1)[1]) in ports["S3"]
    assert int(cluster.head.address.rsplit(":", 1)[1]) in ports["RayHead"]
    assert ports["WorkerNode"], "the second node's raylet listens somewhere"
    wrong = [(name, *s) for name, socks in sockets.items() for s in socks if not ch.is_loopback_127(s[2])]
    assert not wrong, f"sockets not on 127.0.0.1: {wrong}"


# ============================================================================ node loss

def test_a_killed_node_turns_dead_and_leaves_no_process(cluster, ray):
    node = ch.start_isolated_worker_node(cluster.head.address, [cluster.root], num_cpus=1, resources={"node3": 1},
                                         head=cluster.head, node_dir=cluster.root / "n3")
    try:
        def state():
            return {n["NodeID"]: n["Alive"] for n in ray.nodes()}

        assert state().get(node.node_id) is True
        assert sum(state().values()) == 3

        @ray.remote(num_cpus=0, resources={"node3": 0.01})
        def pid():
            import os

            return os.getpid()

        worker_pid = ray.get(pid.remote(), timeout=TIMEOUT)
        assert worker_pid in {p.pid for p in node.processes()}
        node.kill()
        start = time.monotonic()
        deadline = start + 60
        while state().get(node.node_id) is not False:
            assert time.monotonic() < deadline, "the killed node is still alive in the GCS after 60 s"
            time.sleep(0.2)
        assert node.processes() == []
        assert state()[cluster.node.node_id] is True   # the other node lives on
    finally:
        node.stop()
