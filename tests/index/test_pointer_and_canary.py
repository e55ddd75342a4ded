"""The artifact root (pointer file, path confinement) and canary files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from index import ArtifactError, Index, build_ivfpq, write_artifact
from index.canary import make_canaries, read_canaries, recall
from index.pointer import BadArtifactName, PathOutsideRoot, current_version, publish, read_pointer, resolve_in_root
from tests.conftest import clustered


@pytest.fixture
def root(tmp_path):
    x = clustered(600, 16)
    idx = build_ivfpq(x, nlist=8, M=4, ids=[f"i{i}" for i in range(len(x))])
    for v in ("a-v1", "a-v2"):
        write_artifact(tmp_path / v, idx)
    return tmp_path, idx, x


OUTSIDE = "is not inside the artifact root"
UNUSABLE = "the artifact name is empty, not a string, or holds a NUL byte"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("../x", PathOutsideRoot, f"'../x' {OUTSIDE}"),
        ("/etc", PathOutsideRoot, f"'/etc' {OUTSIDE}"),
        ("a-v1/../../x", PathOutsideRoot, f"'a-v1/../../x' {OUTSIDE}"),
        (".", PathOutsideRoot, f"'.' {OUTSIDE}"),  # the root itself is no version
        ("", BadArtifactName, UNUSABLE),
        ("  ", BadArtifactName, UNUSABLE),
        ("a\x00b", BadArtifactName, UNUSABLE),
        (None, BadArtifactName, UNUSABLE),
        ("x" * 256, BadArtifactName, "too long (256 bytes; at most 255 per path component"),
    ],
)
def test_paths_outside_the_root_are_refused(root, name, error, message):
    with pytest.raises(error, match=re.escape(message)) as err:
        resolve_in_root(root[0], name)
    assert type(err.value) is error  # PathOutsideRoot is a BadArtifactName: the exact class matters


def test_symlink_out_of_root_is_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (root[0] / "link").symlink_to(outside)
    with pytest.raises(PathOutsideRoot, match="'link' is not inside the artifact root"):
        resolve_in_root(root[0], "link")
    assert resolve_in_root(root[0], "a-v1") == (root[0] / "a-v1").resolve()


def test_publish_and_current_version(root):
    path = root[0]
    assert read_pointer(path) is None and current_version(path) in ("a-v1", "a-v2")
    publish(path, "a-v1")
    assert read_pointer(path) == "a-v1" == current_version(path)
    refused = r"missing: not an artifact \(no manifest\.json\) nor a shard set \(no shards\.json\)$"
    with pytest.raises(ArtifactError, match=refused):
        publish(path, "missing")  # an ArtifactError, not PathOutsideRoot: "missing" is inside the root
    assert read_pointer(path) == "a-v1"  # the refused publish left the pointer alone
    with pytest.raises(PathOutsideRoot, match=r"'\.\./a-v1' is not inside the artifact root"):
        publish(path, "../a-v1")
    assert read_pointer(path) == "a-v1"
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
    no_ids = "canary.json: queries[0].expected must be a non-empty list of ids"
    with pytest.raises(ArtifactError, match=re.escape(no_ids)):
        read_canaries(path / "a-v2")
