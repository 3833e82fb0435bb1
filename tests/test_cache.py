"""Preprocessed-volume cache: hits, invalidation, side-by-side settings, atomic writes."""
import os

import numpy as np
import pytest
from helpers import toy_ct, write_nifti

from utils.data.cache import VolumeCache
from utils.errors import DataError
from utils.data.nifti_io import load_scan
from utils.data.preprocessing import PreprocessConfig, preprocess

SMALL = PreprocessConfig(target_shape=(16, 16, 8))


class CountingLoader:
    """``load_scan`` that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return load_scan(path)


def cached_files(root):
    """Every file under ``root`` (empty if ``root`` does not exist)."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_first_get_computes_second_hits(tmp_path, toy_nifti):
    loader = CountingLoader()
    cache = VolumeCache(tmp_path / "processed", SMALL, loader=loader)
    first = cache.get(toy_nifti)
    second = cache.get(toy_nifti)
    assert loader.calls == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, preprocess(load_scan(toy_nifti).hu, SMALL))
    assert first.shape == (1, 16, 16, 8) and first.dtype == np.float32
    # a fresh cache object (a new session) reads the file instead of recomputing
    VolumeCache(tmp_path / "processed", SMALL, loader=loader).get(toy_nifti)
    assert loader.calls == 1


@pytest.mark.parametrize("changed", [PreprocessConfig(target_shape=(16, 16, 6)),
                                     PreprocessConfig(hu_min=-900, target_shape=(16, 16, 8)),
                                     PreprocessConfig(hu_max=300, target_shape=(16, 16, 8)),
                                     PreprocessConfig(target_shape=(16, 16, 8), anti_alias=False),
                                     PreprocessConfig(target_shape=(16, 16, 8), target_spacing=(2.0, 2.0, 1.0))])
def test_config_change_recomputes(tmp_path, toy_nifti, changed):
    loader = CountingLoader()
    base = VolumeCache(tmp_path, SMALL, loader=loader).get(toy_nifti)
    other = VolumeCache(tmp_path, changed, loader=loader).get(toy_nifti)
    assert loader.calls == 2
    assert other.shape != base.shape or not np.array_equal(other, base)
    assert VolumeCache(tmp_path, changed).folder != VolumeCache(tmp_path, SMALL).folder
    assert len([f for f in cached_files(tmp_path) if f.endswith(".npy")]) == 2  # another entry beside the first


def test_target_spacing_uses_the_scan_spacing(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", toy_ct(), affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    config = PreprocessConfig(target_shape=(16, 16, 8), target_spacing=(1.0, 1.0, 1.0))
    scan = load_scan(path)
    assert tuple(scan.spacing) == (2.0, 2.0, 3.0)
    np.testing.assert_array_equal(VolumeCache(tmp_path / "processed", config).get(path),
                                  preprocess(scan.hu, config, spacing=scan.spacing))


def test_source_change_recomputes(tmp_path):
    loader = CountingLoader()
    scan = write_nifti(tmp_path / "scan.nii.gz", toy_ct(seed=0))
    cache = VolumeCache(tmp_path / "processed", SMALL, loader=loader)
    before = cache.get(scan)
    stat = scan.stat()
    write_nifti(scan, toy_ct(seed=1))
    os.utime(scan, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even if the size were equal
    after = cache.get(scan)
    assert loader.calls == 2 and not np.array_equal(before, after)
    assert len(cached_files(tmp_path / "processed")) == 1  # the superseded copy is gone


def test_hires_copy_beside_default(tmp_path, toy_nifti):
    low = VolumeCache(tmp_path, SMALL).get(toy_nifti)
    high = VolumeCache(tmp_path, PreprocessConfig(target_shape=(32, 32, 8))).get(toy_nifti)
    assert low.shape == (1, 16, 16, 8) and high.shape == (1, 32, 32, 8)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == sorted([SMALL.key(), PreprocessConfig(target_shape=(32, 32, 8)).key()])
    assert VolumeCache(tmp_path, SMALL).get(toy_nifti).shape == (1, 16, 16, 8)


def test_corrupt_cache_file_is_recomputed(tmp_path, toy_nifti):
    loader = CountingLoader()
    cache = VolumeCache(tmp_path, SMALL, loader=loader)
    good = cache.get(toy_nifti)
    cache.cache_path(toy_nifti).write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(cache.get(toy_nifti), good)
    assert loader.calls == 2


def test_bad_scan_writes_nothing(tmp_path):
    bad = write_nifti(tmp_path / "nan.nii.gz", np.full((20, 20, 6), np.nan, dtype=np.float32))
    cache = VolumeCache(tmp_path / "processed", SMALL)
    with pytest.raises(DataError, match="nan.nii.gz"):
        cache.get(bad)
    assert cached_files(tmp_path / "processed") == []


def test_failed_write_leaves_no_partial_file(tmp_path, toy_nifti, monkeypatch):
    cache = VolumeCache(tmp_path / "processed", SMALL)

    def failing_save(handle, array, allow_pickle=False):
        handle.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.get(toy_nifti)
    assert cached_files(tmp_path / "processed") == []


def test_warm_fills_the_cache(tmp_path):
    scans = [write_nifti(tmp_path / f"s{k}.nii.gz", toy_ct(seed=k)) for k in range(3)]
    loader = CountingLoader()
    cache = VolumeCache(tmp_path / "processed", SMALL, loader=loader)
    cache.warm(scans, progress=False)
    assert loader.calls == 3 and len(cached_files(tmp_path / "processed")) == 3
    cache.warm(scans, progress=False)
    assert loader.calls == 3
