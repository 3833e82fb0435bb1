"""Synthetic chest-CT phantoms: geometry, tissue HU, lesions, determinism, dataset layout, CLI."""
import json

import nibabel as nib
import numpy as np
import pytest

from utils.errors import DataError
from utils.data.nifti_io import load_nifti
from utils.data.phantom_anatomy import DIFFICULTIES, SEVERITY_BANDS, Difficulty
from utils.data.phantoms import PhantomConfig, generate_phantom, main, write_dataset

SMALL = PhantomConfig(size=48)


def _phantom(category, seed=0, config=SMALL):
    return generate_phantom(np.random.default_rng([seed, category]), category, config)


@pytest.mark.parametrize("size, category", [(48, 0), (48, 1), (64, 0), (64, 3), (96, 1)])
def test_geometry_like_mosmeddata(size, category):
    hu, affine, info = _phantom(category, config=PhantomConfig(size=size))
    assert hu.dtype == np.int16
    assert hu.shape[:2] == (size, size) and 30 <= hu.shape[2] <= 50
    sx, sy, sz = info["spacing"]
    np.testing.assert_allclose(np.diag(affine)[:3], [-sx, -sy, sz])  # negative x and y, like MosMedData
    assert 0.58 * 512 / size <= sx <= 0.92 * 512 / size and 7.5 <= sz <= 8.5
    assert hu[0, 0, :].tolist() == [-2048] * hu.shape[2]  # corners lie outside the circular field of view
    inside = hu[hu != -2048]
    assert inside.min() >= -1024 and inside.max() > 300  # bone


@pytest.mark.parametrize("seed", range(4))
def test_tissue_hu_plausible(seed):
    hu, _, info = _phantom(0, seed)
    lung = info["lung_mask"]
    assert 0.01 < lung.mean() < 0.5
    assert -920 <= np.median(hu[lung]) <= -700  # healthy parenchyma; the dependent band covers < 25 %
    centre = hu[hu.shape[0] // 2 - 2: hu.shape[0] // 2 + 2, :, hu.shape[2] // 2]
    assert (centre > 300).any()  # the vertebra on the midline


def test_same_seed_same_scan_different_seed_different_scan():
    hu_a, affine_a, _ = _phantom(1, seed=5)
    hu_b, affine_b, _ = _phantom(1, seed=5)
    hu_c, _, _ = _phantom(1, seed=6)
    np.testing.assert_array_equal(hu_a, hu_b)
    np.testing.assert_array_equal(affine_a, affine_b)
    assert hu_a.shape != hu_c.shape or not np.array_equal(hu_a, hu_c)


@pytest.mark.parametrize("seed", range(6))
def test_lesions_only_inside_lungs_and_only_in_abnormal_scans(seed):
    normal_hu, _, normal = _phantom(0, seed)
    assert not normal["lesion_mask"].any() and normal["involved_fraction"] == 0.0
    hu, _, abnormal = _phantom(1, seed)
    lesion, lung = abnormal["lesion_mask"], abnormal["lung_mask"]
    assert lesion.any() and abnormal["lesion_count"] >= 1
    assert not (lesion & ~lung).any()


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_normal_scans_spend_the_same_dense_volume_on_a_dependent_band(seed):
    """Same seed, same patient and foci: the normal scan carries the abnormal scan's dense
    volume as a posterior band instead of focal lesions."""
    config = PhantomConfig(size=64)
    scans = [generate_phantom(np.random.default_rng([seed, 9]), category, config) for category in (0, 1)]
    dense = [(hu > -600) & info["lung_mask"] for hu, _, info in scans]  # GGO and consolidation range
    (_, _, normal), (_, _, abnormal) = scans
    assert normal["dependent_fraction"] > 0.05 and not normal["lesion_mask"].any()
    assert abs(dense[0].sum() - dense[1].sum()) < 0.15 * dense[1].sum()
    posterior_shift = [np.nonzero(d)[1].mean() - np.nonzero(info["lung_mask"])[1].mean()  # array Y = +posterior
                       for d, (_, _, info) in zip(dense, scans)]
    assert posterior_shift[0] > posterior_shift[1]


def test_lesions_raise_attenuation_where_they_are():
    config = PhantomConfig(size=64, difficulty=DIFFICULTIES["easy"])
    hu, _, info = _phantom(1, seed=3, config=config)
    lesion, lung = info["lesion_mask"], info["lung_mask"]
    assert hu[lesion].mean() > hu[lung & ~lesion].mean() + 100


@pytest.mark.parametrize("category", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_involved_fraction_within_severity_band(category, seed):
    _, _, info = _phantom(category, seed, PhantomConfig(size=48))
    lo, hi = SEVERITY_BANDS[category]
    measured = info["lesion_mask"].sum() / info["lung_mask"].sum()
    assert measured == pytest.approx(info["involved_fraction"])
    assert lo < measured < hi if category == 1 else lo <= measured <= hi


def test_difficulty_presets_order_lesion_burden():
    easy, default, hard = (DIFFICULTIES[k] for k in ("easy", "default", "hard"))
    assert easy.lesion_radius_mm[1] > default.lesion_radius_mm[1] > hard.lesion_radius_mm[1]
    assert easy.contrast >= default.contrast >= hard.contrast
    assert easy.mild_share <= default.mild_share <= hard.mild_share
    assert easy.focal_share >= default.focal_share >= hard.focal_share
    burden = {}
    for name in ("easy", "hard"):
        config = PhantomConfig(size=48, difficulty=DIFFICULTIES[name])
        burden[name] = np.mean([_phantom(1, s, config)[2]["involved_fraction"] for s in range(6)])
    assert burden["easy"] > burden["hard"]


@pytest.mark.parametrize("kwargs", [dict(lesion_count=(0, 3)), dict(lesion_count=(4, 2)), dict(contrast=1.5),
                                    dict(mild_share=-0.1), dict(lesion_radius_mm=(0.0, 5.0)),
                                    dict(focal_share=1.2), dict(patchiness=-0.5)])
def test_difficulty_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="Difficulty"):
        Difficulty(**kwargs)


def test_bad_category_and_config_raise():
    with pytest.raises(ValueError, match="category"):
        generate_phantom(np.random.default_rng(0), 5, SMALL)
    with pytest.raises(ValueError, match="size"):
        PhantomConfig(size=8)


def test_cli_writes_ct0_ct23_layout(tmp_path):
    out = tmp_path / "MosMedData"
    paths = main(["--out", str(out), "--n", "6", "--seed", "0", "--size", "48", "--quiet"])
    assert sorted(p.relative_to(out).as_posix() for p in paths) == [
        "CT-0/study_0001.nii.gz", "CT-0/study_0002.nii.gz", "CT-0/study_0003.nii.gz",
        "CT-23/study_0004.nii.gz", "CT-23/study_0005.nii.gz", "CT-23/study_0006.nii.gz"]
    img = nib.load(paths[0])
    assert img.get_data_dtype() == np.int16
    assert img.affine[0, 0] < 0 and img.header["sform_code"] > 0 and img.header["qform_code"] > 0
    volume = load_nifti(paths[-1])  # the project's loader reads them
    assert volume.hu.shape[:2] == (48, 48)
    # the file holds exactly the generated scan
    hu, _, _ = generate_phantom(np.random.default_rng([0, 6]), 1, PhantomConfig(size=48))
    np.testing.assert_array_equal(np.asarray(nib.load(paths[-1]).dataobj), hu)
    assert json.loads((out / "phantoms.json").read_text())["complete"] is True


def test_cli_writes_studies_layout(tmp_path):
    paths = main(["--out", str(tmp_path), "--n", "10", "--layout", "studies", "--size", "48", "--quiet",
                  "--difficulty", "hard"])
    folders = [p.parent.relative_to(tmp_path).as_posix() for p in paths]
    assert {f: folders.count(f) for f in set(folders)} == {
        "studies/CT-0": 4, "studies/CT-1": 2, "studies/CT-2": 2, "studies/CT-3": 1, "studies/CT-4": 1}
    assert len({p.name for p in paths}) == 10  # study numbers unique across folders


def test_existing_dataset_is_kept_changed_settings_regenerate(tmp_path):
    config = PhantomConfig(size=48)
    paths = write_dataset(tmp_path, 4, seed=0, config=config, progress=False)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert write_dataset(tmp_path, 4, seed=0, config=config, progress=False) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    paths[1].unlink()  # an interrupted run: only the missing scan is written again
    write_dataset(tmp_path, 4, seed=0, config=config, progress=False)
    assert paths[1].is_file() and paths[0].stat().st_mtime_ns == stamps[0]
    new = write_dataset(tmp_path, 2, seed=1, config=config, progress=False)
    assert sorted(tmp_path.rglob("*.nii.gz")) == sorted(new)


def test_refuses_to_write_into_real_data(tmp_path):
    (tmp_path / "CT-0").mkdir()
    (tmp_path / "CT-0" / "study_0001.nii.gz").write_bytes(b"real scan")
    with pytest.raises(DataError, match="not written by the phantom generator"):
        write_dataset(tmp_path, 4, seed=0, config=SMALL, progress=False)


def test_parallel_writing_gives_the_same_files_as_serial(tmp_path, monkeypatch):
    """Scan i depends on (seed, i) only: 2 worker processes write byte-identical volumes."""
    import utils.data.phantoms as phantoms

    serial = write_dataset(tmp_path / "serial", 4, seed=3, config=SMALL, progress=False)
    monkeypatch.setattr(phantoms, "PHANTOMS_PER_WORKER", 2)
    monkeypatch.setattr(phantoms.os, "cpu_count", lambda: 2)
    parallel = write_dataset(tmp_path / "parallel", 4, seed=3, config=SMALL, progress=False)
    for a, b in zip(serial, parallel):
        assert a.relative_to(tmp_path / "serial") == b.relative_to(tmp_path / "parallel")
        assert np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
