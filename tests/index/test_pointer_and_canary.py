"""The artifact root (pointer file, path confinement) and canary files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index import ArtifactError, Index, build_ivfpq, write_artifact
from index.canary import make_canaries, read_canaries, recall
from index.pointer import PathOutsideRoot, current_version, publish, read_pointer, resolve_in_root
from tests.conftest import clustered


@pytest.fixture
def root(tmp_path):
    x = clustered(600, 16)
    idx = build_ivfpq(x, nlist=8, M=4, ids=[f"i{i}" for i in range(len(x))])
    for v in ("a-v1", "a-v2"):
        write_artifact(tmp_path / v, idx)
    return tmp_path, idx, x


@pytest.mark.parametrize("name", ["../x", "/etc", "a-v1/../../x", "", "  ", ".", "a\x00b"])
def test_paths_outside_the_root_are_refused(root, name):
    with pytest.raises(PathOutsideRoot):
        resolve_in_root(root[0], name)


def test_symlink_out_of_root_is_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (root[0] / "link").symlink_to(outside)
    with pytest.raises(PathOutsideRoot):
        resolve_in_root(root[0], "link")
    assert resolve_in_root(root[0], "a-v1") == (root[0] / "a-v1").resolve()


def test_publish_and_current_version(root):
    path = root[0]
    assert read_pointer(path) is None and current_version(path) in ("a-v1", "a-v2")
    publish(path, "a-v1")
    assert read_pointer(path) == "a-v1" == current_version(path)
    with pytest.raises(Exception, match="not an artifact"):
        publish(path, "missing")
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_canaries_round_trip_and_gate(root):
    path, idx, x = root
    index = Index.in_memory(idx)
    q = x[:5] + 0.01
    expected = [[f"i{i}"] for i in range(5)]
    cs = make_canaries(q, expected, lambda v, k, n: index.search(v, k, n)[1], k=10, nprobe=8)
    assert cs.measured_recall >= 0.6 and cs.min_recall == pytest.approx(0.8 * cs.measured_recall)
    (path / "a-v1" / "canary.json").write_bytes(cs.dumps())
    back = read_canaries(path / "a-v1")
    assert back.min_recall == cs.min_recall and len(back.queries) == 5
    np.testing.assert_allclose(np.asarray(back.queries[0].vector, np.float32), q[0])
    assert recall([["a", "b"]], [["b", "c"]]) == 0.5
    assert read_canaries(path / "a-v2") is None
    (path / "a-v2" / "canary.json").write_text(json.dumps({"queries": [{"vector": [1]}]}))
    with pytest.raises(ArtifactError, match="malformed canary"):
        read_canaries(path / "a-v2")
