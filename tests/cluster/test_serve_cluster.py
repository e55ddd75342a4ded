"""The sharded service on a real local Ray Serve (2 shards x 2 replicas), over real HTTP: the same
answers as the single-process service, a version swap under load without a failed request or a
mixed response, a killed replica under load without a failed request, a shard with no replica
left giving flagged partial answers (or 503 by setting), never a 500 or a hang.

One deployment serves the whole module (a Serve deployment costs ~20 s on 2 cores); the tests
run in file order and the later ones build on the earlier (the swap leaves vec-v2 serving)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import clustered
from tests.service.conftest import TOKEN, Server

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 64


@pytest.fixture(scope="module")
def root(artifact_root, tmp_path_factory):
    """A copy of the session's artifact root (text-v1: a hashed-encoder demo artifact, SciFact doc
    ids, canaries; CURRENT at it) plus vec-v2 and vec-v3 (vectors only, the same dim, ids b-* and
    c-*): a response's ids tell which version produced it. A copy: the cluster writes shard sets
    and the item log into its root."""
    from index import build_ivfpq, write_artifact

    root = tmp_path_factory.mktemp("cluster") / "root"
    shutil.copytree(artifact_root, root)
    x = clustered(3000, DIM, seed=7)
    write_artifact(root / "vec-v2", build_ivfpq(x, nlist=16, M=8, ids=[f"b-{i}" for i in range(len(x))]))
    write_artifact(root / "vec-v3", build_ivfpq(x, nlist=16, M=8, ids=[f"c-{i}" for i in range(len(x))]))
    return root


@pytest.fixture(scope="module")
def cluster(ray_cluster, root):
    from ray import serve

    from cluster.app import APP_NAME, build
    from cluster.sharded import ClusterConfig

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ClusterConfig(shards=2, replicas=2, shard_deadline_s=1.5, drain_s=10)
    env = {"JOINTPQ_ADMIN_TOKEN": TOKEN, "JOINTPQ_DEVICE": "cpu", "JOINTPQ_TORCH_THREADS": "1",
           "JOINTPQ_WATCH": "true", "JOINTPQ_WATCH_INTERVAL_S": "0.5"}  # fmt: skip
    serve.run(build(config, artifact_root=str(root), replica_cpus=0.2, router_cpus=0.2, shard_threads=1, env=env),
              name=APP_NAME, route_prefix="/")  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the cluster never became ready"
        time.sleep(0.2)
    yield client
    client.close()
    serve.delete(APP_NAME)


def in_id_order(result):
    """Ties (equal scores) in the documented order, by id: the single-process engines order them arbitrarily."""
    pairs = sorted(zip(result["scores"], result["ids"], strict=True), key=lambda p: (-p[0], p[1]))
    return [i for _, i in pairs], [s for s, _ in pairs]


def test_the_cluster_answers_as_the_single_process_service(cluster, root):
    from service.settings import Settings

    queries = ["protein folding in yeast", "vitamin D deficiency and bone density", "cancer immunotherapy"]
    vectors = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32).tolist()
    bodies = [{"queries": queries, "k": 10}, {"vectors": vectors, "k": 7, "nprobe": 4}, {"query": queries[0]}]
    with Server(Settings(artifact_root=root, device="cpu", admin_token=TOKEN)) as single:
        one = httpx.Client(base_url=single.url, timeout=30)
        for body in bodies:
            a, b = one.post("/search", json=body).json(), cluster.post("/search", json=body).json()
            assert b["version"] == a["version"] == "text-v1"
            assert b["coverage"] == {"answered": 2, "shards": 2, "partial": False}
            assert [in_id_order(r) for r in b["results"]] == [in_id_order(r) for r in a["results"]]
        for bad in ({"vectors": [[1.0, 2.0]]}, {"k": 0, "query": "x"}, {"queries": []}, {"query": 5}):
            a, b = one.post("/search", json=bad), cluster.post("/search", json=bad)
            assert (b.status_code, b.json()) == (a.status_code, a.json()), bad  # the same errors, field named
    info = cluster.get("/info").json()
    assert info["artifact"]["version"] == "text-v1" and info["artifact"]["checks"]["shards"] == 2
    assert info["artifact"]["checks"]["canary"]["recall"] >= info["artifact"]["checks"]["canary"]["min_recall"]
    assert "jointpq_queries_total{kind=\"text\"}" in cluster.get("/metrics").text


class Load:
    """Threads posting vector searches until stopped; every response (or exception) kept."""

    def __init__(self, client: httpx.Client, threads: int = 3):
        self.base = str(client.base_url)
        self.stop = threading.Event()
        self.out: list[tuple[int, dict | str, float]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=self.base, timeout=30) as c:
            while not self.stop.is_set():
                body = {"vectors": rng.standard_normal((2, DIM)).astype(np.float32).tolist(), "k": 5}
                t0 = time.monotonic()
                try:
                    r = c.post("/search", json=body)
                    self.out.append((r.status_code, r.json(), time.monotonic() - t0))
                except Exception as e:  # a dropped connection is a failed request too
                    self.out.append((0, repr(e), time.monotonic() - t0))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_version_swap_under_load_fails_no_request_and_mixes_no_versions(cluster):
    from ray import serve

    with Load(cluster) as load:
        time.sleep(1.0)
        r = cluster.post("/admin/reload", json={"version": "vec-v2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        time.sleep(1.0)
    assert load.out and all(status == 200 for status, _, _ in load.out), [o for o in load.out if o[0] != 200][:3]
    versions = {body["version"] for _, body, _ in load.out}
    assert versions == {"text-v1", "vec-v2"}  # requests ran on both sides of the switch
    for _, body, _ in load.out:
        ids = [i for res in body["results"] for i in res["ids"]]
        if body["version"] == "vec-v2":
            assert all(i.startswith("b-") for i in ids)
        else:
            assert not any(i.startswith("b-") for i in ids)
    # the old version is drained and dropped by every replica of every shard
    time.sleep(1.0)
    for s in range(2):
        held = serve.get_deployment_handle(f"shard-{s}", "jointpq").broadcast("keys").results(timeout_s=30)
        assert len(held) == 2 and all(len(k) == 1 and k[0].startswith("vec-v2#") for k in held), held


def test_a_live_write_reaches_the_owning_shard_and_the_next_search(cluster):
    from ray import serve

    from index.shard import shard_of

    v = np.random.default_rng(9).standard_normal(DIM).astype(np.float32) * 10
    r = cluster.post("/admin/items", json={"items": [{"id": "new-1", "vector": v.tolist()}]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = cluster.post("/search", json={"vector": v.tolist(), "k": 3}).json()
    assert body["results"][0]["ids"][0] == "new-1"  # read-your-writes through the router
    owner = int(shard_of(["new-1"], 2)[0])
    for s in range(2):
        handle = serve.get_deployment_handle(f"shard-{s}", "jointpq")
        key = handle.broadcast("keys").results(timeout_s=30)[0][0]
        held = handle.broadcast("contains", key, ["new-1"], r.json()["seq"]).results(timeout_s=30)
        assert held == [[s == owner]] * 2  # both replicas of the owner have it, the other shard's none
    r = cluster.post("/admin/items/delete", json={"ids": ["new-1", "never-there"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["unknown"] == ["never-there"], r.text
    body = cluster.post("/search", json={"vector": v.tolist(), "k": 3}).json()
    assert "new-1" not in body["results"][0]["ids"]
    r = cluster.post("/admin/compact", headers=AUTH)  # the items live in the shards: compacted offline
    assert r.status_code == 409 and "jointpq compact" in r.json()["error"], r.text


def replica_actors(deployment: str) -> list:
    import ray
    from ray.util import list_named_actors

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]  # fmt: skip


def test_a_killed_replica_under_load_fails_no_request(cluster):
    import ray

    victims = replica_actors("shard-0")
    assert len(victims) == 2
    with Load(cluster) as load:
        time.sleep(0.5)
        ray.kill(victims[0], no_restart=True)
        time.sleep(2.5)
    assert all(status == 200 for status, _, _ in load.out), [o for o in load.out if o[0] != 200][:3]
    assert all(body["coverage"]["answered"] == 2 for _, body, _ in load.out)  # the other replica answered


def test_a_shard_with_no_replica_left_answers_partial_never_500_or_hang(cluster):
    import ray

    deadline = 1.5
    victims = replica_actors("shard-1")
    for v in victims:
        ray.kill(v, no_restart=True)
    out = []
    for _ in range(4):
        t0 = time.monotonic()
        r = cluster.post("/search", json={"vector": [0.1] * DIM, "k": 5})
        out.append((r.status_code, r.json(), time.monotonic() - t0))
    assert all(status == 200 for status, _, _ in out), out
    assert all(took < deadline + 3 for _, _, took in out)  # bounded by the deadline: no hang
    partial = [b for _, b, _ in out if b["coverage"]["partial"]]
    assert partial and all(b["coverage"] == {"answered": 1, "shards": 2, "partial": True} for b in partial)
    assert all(len(b["results"][0]["ids"]) == 5 for _, b, _ in out)  # the answering shard's items
    # Serve replaces the replicas; they load the served version on their first request: full answers again
    end = time.monotonic() + 60
    while time.monotonic() < end:
        body = cluster.post("/search", json={"vector": [0.1] * DIM, "k": 5}).json()
        if not body["coverage"]["partial"]:
            break
        time.sleep(0.5)
    assert not body["coverage"]["partial"]


def test_the_503_setting_refuses_partial_answers(cluster, root):
    """The same fan-out with `on_partial="503"`: a shard without a replica fails the query with
    ShardsUnavailable, which the service answers 503 (service.errors.api_error)."""
    import ray
    from ray import serve

    from cluster.sharded import ClusterConfig, ShardedIndex, ShardsUnavailable
    from index import read_artifact
    from index.shard import quantizer_only, read_shard_set
    from service.errors import api_error

    handles = [serve.get_deployment_handle(f"shard-{s}", "jointpq") for s in range(2)]
    key = serve.get_deployment_handle("shard-0", "jointpq").broadcast("keys").results(timeout_s=30)[0][0]
    shard_set = read_shard_set(next((root / ".shards").glob("vec-v2-*-of-2")))
    manifest, data = read_artifact(shard_set.member(0))
    index = ShardedIndex(key, shard_set, handles, ClusterConfig(2, 2, on_partial="503", shard_deadline_s=1.0),
                         quantizer_only(data), manifest, "torch")  # fmt: skip
    x = np.random.default_rng(3).standard_normal((2, DIM)).astype(np.float32)
    assert index.search_covered(x, 5, 4)[2]["partial"] is False
    for v in replica_actors("shard-0"):
        ray.kill(v, no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(ShardsUnavailable, match="did not answer") as e:
        index.search_covered(x, 5, 4)
    assert time.monotonic() - t0 < 3
    assert api_error(e.value).status == 503



def test_the_current_pointer_switches_the_cluster(cluster, root):
    """As `jointpq serve --watch`: publishing another version swaps every shard to it (after the
    kills above, the replicas Serve started in their place take part)."""
    from index.pointer import publish

    publish(root, "vec-v3")
    end = time.monotonic() + 90
    while cluster.get("/readyz").json().get("version") != "vec-v3":
        assert time.monotonic() < end, cluster.get("/info").json()["watch"]["last_error"]
        time.sleep(0.3)
    body = cluster.post("/search", json={"vector": [0.2] * DIM, "k": 4}).json()
    assert body["version"] == "vec-v3" and all(i.startswith("c-") for i in body["results"][0]["ids"])
    assert body["coverage"]["answered"] == 2
