"""Vector file formats: TEXMEX round trips and malformed files named clearly."""

from __future__ import annotations

import numpy as np
import pytest

from index.vectors import read_vecs, read_vectors, write_vecs


@pytest.mark.parametrize("suffix", [".fvecs", ".bvecs", ".ivecs"])
def test_vecs_round_trip(tmp_path, suffix):
    x = (np.arange(60).reshape(5, 12) % 200).astype(
        {".fvecs": np.float32, ".bvecs": np.uint8, ".ivecs": np.int32}[suffix]
    )
    write_vecs(tmp_path / f"x{suffix}", x)
    np.testing.assert_array_equal(read_vecs(tmp_path / f"x{suffix}"), x)
    assert read_vectors(tmp_path / f"x{suffix}").dtype == np.float32


def test_truncated_fvecs_is_refused(tmp_path):
    write_vecs(tmp_path / "x.fvecs", np.ones((3, 4), np.float32))
    data = (tmp_path / "x.fvecs").read_bytes()
    (tmp_path / "x.fvecs").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="not a multiple of the row size 20 B"):
        read_vectors(tmp_path / "x.fvecs")


def test_inconsistent_row_dims_are_refused(tmp_path):
    write_vecs(tmp_path / "x.ivecs", np.ones((3, 4), np.int32))
    raw = np.fromfile(tmp_path / "x.ivecs", dtype="<i4")
    raw[5] = 9  # row 1's dimension header
    raw.tofile(tmp_path / "x.ivecs")
    with pytest.raises(ValueError, match="row 1 declares dimension 9, row 0 declares 4"):
        read_vectors(tmp_path / "x.ivecs")


def test_npy_nan_and_wrong_rank_are_refused(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], np.float32))
    np.save(tmp_path / "flat.npy", np.ones(4, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_vectors(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match="expected a 2-D matrix"):
        read_vectors(tmp_path / "flat.npy")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"unknown vector format '\.txt'"):
        read_vectors(tmp_path / "x.txt")
