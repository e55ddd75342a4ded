"""The artifact round-trips, and every kind of damage is refused with a message naming it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from index import ArtifactError, load_index, read_artifact, write_artifact
from index.artifact import IDS, MANIFEST, TENSORS


@pytest.fixture
def artifact(tmp_path, small_indexes):
    return write_artifact(tmp_path / "v1", small_indexes["l2", 4, True], training={"mode": "two-step", "seed": 3})


def test_artifact_round_trips(artifact, small_indexes, small_data):
    src = small_indexes["l2", 4, True]
    manifest, got = read_artifact(artifact)
    for name in ("rotation", "centroids", "codebooks", "codes", "offsets"):
        assert torch.equal(getattr(got, name), getattr(src, name)), name
    assert got.ids.tolist() == src.ids.tolist()
    assert (manifest.metric, manifest.dim, manifest.nlist, manifest.M, manifest.nbits) == ("l2", 32, 16, 16, 4)
    assert manifest.n_items == src.n and manifest.version == "v1" and manifest.training["seed"] == 3
    raw = json.loads((artifact / MANIFEST).read_text())
    assert raw["K"] == 16 and raw["code_size"] == 8 and set(raw["files"]) == {TENSORS, IDS}
    _, xq = small_data
    idx = load_index(artifact, device="cpu", backend="torch")
    _, ids = idx.search(xq[:3], k=5, nprobe=4)
    assert len(ids) == 3 and all(len(i) == 5 for i in ids) and all(i.startswith("doc-") for i in ids[0])


def test_ids_survive_any_string(tmp_path, small_indexes):
    src = small_indexes["ip", 8, False]
    weird = np.array([f'sku/{i} "ü" \n\t{chr(0x1F600)}' for i in range(src.n)], dtype=object)
    import dataclasses

    path = write_artifact(tmp_path / "weird", dataclasses.replace(src, ids=weird))
    assert read_artifact(path)[1].ids.tolist() == weird.tolist()


def test_extra_files_are_listed_and_verified(tmp_path, small_indexes):
    path = write_artifact(tmp_path / "x", small_indexes["ip", 8, False], extra_files={"encoder/config.json": b"{}"})
    assert "encoder/config.json" in read_artifact(path)[0].files
    (path / "encoder" / "config.json").write_bytes(b"{ }")
    with pytest.raises(ArtifactError, match=r"encoder/config.json: size is 3 bytes"):
        read_artifact(path)


def test_writing_is_atomic_and_versions_are_immutable(tmp_path, small_indexes):
    index = small_indexes["ip", 8, False]
    write_artifact(tmp_path / "v1", index)
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(tmp_path / "v1", index)
    with pytest.raises(ArtifactError, match="not a valid file name"):
        write_artifact(tmp_path / "v2", index, extra_files={"../escape": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # no temp dir left behind


def test_duplicate_ids_are_refused(tmp_path, small_indexes):
    import dataclasses

    src = small_indexes["ip", 8, False]
    ids = src.ids.copy()
    ids[1] = ids[0]
    with pytest.raises(ArtifactError, match="not unique"):
        write_artifact(tmp_path / "dup", dataclasses.replace(src, ids=ids))


def _edit_manifest(path, **changes):
    raw = json.loads((path / MANIFEST).read_text())
    raw.update(changes)
    (path / MANIFEST).write_text(json.dumps(raw))


def test_flipped_byte_is_refused(artifact):
    f = artifact / TENSORS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{TENSORS}: sha256 mismatch"):
        load_index(artifact)


def test_truncated_tensor_file_is_refused(artifact):
    f = artifact / TENSORS
    size = f.stat().st_size
    os.truncate(f, size - 100)
    with pytest.raises(ArtifactError, match=rf"{TENSORS}: size is {size - 100} bytes, manifest.json says {size}"):
        load_index(artifact)


def test_truncated_tensor_with_matching_manifest_is_refused(artifact):
    """Even with checksums skipped, a cut safetensors file cannot load."""
    f = artifact / TENSORS
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(ArtifactError, match=rf"{TENSORS}: unreadable"):
        read_artifact(artifact, verify=False)


@pytest.mark.parametrize("name", [TENSORS, IDS, MANIFEST])
def test_missing_file_is_refused(artifact, name):
    (artifact / name).unlink()
    with pytest.raises(ArtifactError, match=rf"{name}: missing"):
        load_index(artifact)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_index(tmp_path / "nope")


def test_wrong_format_version_is_refused(artifact):
    _edit_manifest(artifact, format_version=99)
    with pytest.raises(ArtifactError, match=r"format_version 99 is not supported \(this build reads 1\)"):
        load_index(artifact)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dim", 64, r"tensor 'rotation' is \(32, 32\) torch.float32, manifest.json implies \(64, 64\)"),
        ("nlist", 8, r"tensor 'centroids' is \(16, 32\) torch.float32, manifest.json implies \(8, 32\)"),
        ("M", 8, r"tensor 'codebooks' is \(16, 16, 2\) torch.float32, manifest.json implies \(8, 16, 4\)"),
        ("n_items", 10, r"tensor 'codes' is \(3000, 8\) torch.uint8, manifest.json implies \(10, 8\)"),
        ("dim", "32", r"field 'dim' must be an integer in \[1, 65536\], got '32'"),
        # crafted manifests an outside probe used to crash the loader (500s) instead of a refusal
        ("nbits", 20000, r"field 'nbits' must be an integer in \[1, 8\], got 20000"),
        ("nbits", 6, r"field 'nbits' must be one of \(4, 8\), got 6"),
        ("M", 0, r"field 'M' must be an integer in \[1, 4096\], got 0"),
        ("M", 5, r"M=5 must divide dim=32"),
        ("metric", "cosine", r"field 'metric' must be one of \('ip', 'l2'\), got 'cosine'"),
        ("training", [1], r"field 'training' must be a JSON object"),
        ("files", {"../x": {"sha256": "0", "bytes": 1}}, r"\.\./x: not a valid file name"),
    ],
)
def test_manifest_lying_about_dims_is_refused(artifact, field, value, message):
    _edit_manifest(artifact, **{field: value})
    with pytest.raises(ArtifactError, match=message):
        load_index(artifact)


def test_garbage_manifest_is_refused(artifact):
    (artifact / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        load_index(artifact)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, r"manifest\.json: JSON nested too deeply"),
        (b'{"dim": ' + b"9" * 5000 + b"}", r"manifest\.json: not valid JSON \(Exceeds the limit"),
        (b'{"version": "\xff\xfe"}', r"manifest\.json: not UTF-8"),
    ],
    ids=["nested-100k", "5000-digit-int", "bad-utf8"],
)
def test_hostile_json_is_an_artifact_error(artifact, raw, message):
    """Each of these escaped as RecursionError / ValueError / UnicodeDecodeError (a 500 on reload)."""
    (artifact / MANIFEST).write_bytes(raw)
    with pytest.raises(ArtifactError, match=message):
        load_index(artifact)


def test_hostile_item_ids_are_an_artifact_error(artifact):
    nested = b"[" * 100_000 + b"]" * 100_000
    (artifact / IDS).write_bytes(nested)
    raw = json.loads((artifact / MANIFEST).read_text())
    import hashlib

    raw["files"][IDS] = {"sha256": hashlib.sha256(nested).hexdigest(), "bytes": len(nested)}
    (artifact / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"item_ids\.json: JSON nested too deeply"):
        load_index(artifact)


def test_every_file_gets_the_same_permissions(artifact):
    """safetensors writes 0600; an artifact's files must all be readable alike (e.g. by a
    service running as another user in the same group), so they follow the umask together."""
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in artifact.iterdir()}
    assert modes[TENSORS] == modes[IDS] == modes[MANIFEST], modes


def test_inconsistent_tensors_with_valid_checksums_are_refused(artifact):
    """A buggy writer can produce matching checksums; the index's own consistency check still runs."""
    from safetensors.torch import load_file, save_file

    from index.artifact import sha256_file

    tensors = load_file(str(artifact / TENSORS))
    tensors["offsets"][3] = tensors["offsets"][4] + 5  # cell 3 now ends before it starts
    save_file(tensors, str(artifact / TENSORS))
    raw = json.loads((artifact / MANIFEST).read_text())
    raw["files"][TENSORS] = {"sha256": sha256_file(artifact / TENSORS), "bytes": (artifact / TENSORS).stat().st_size}
    (artifact / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=rf"{TENSORS}: offsets: not non-decreasing"):
        load_index(artifact)


def test_copy_of_an_artifact_still_loads(artifact, tmp_path):
    shutil.copytree(artifact, tmp_path / "copy")
    assert load_index(tmp_path / "copy").version == "v1"
