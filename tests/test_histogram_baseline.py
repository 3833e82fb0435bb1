"""Histogram + logistic-regression baseline: features, and the phantoms' confounder check."""
import numpy as np
import pytest

from utils.data.discovery import discover_scans
from utils.errors import DataError
from utils.histogram_baseline import histogram_baseline_accuracy, histogram_features, main
from utils.data.phantoms import DIFFICULTIES, PhantomConfig, write_dataset


@pytest.mark.parametrize("bins, shape", [(32, (8, 8, 4)), (16, (5, 7, 3)), (4, (100,))])
def test_histogram_features_normalised(bins, shape):
    hu = np.random.default_rng(0).uniform(-1500, 1500, shape)
    features = histogram_features(hu, bins=bins)
    assert features.shape == (bins,)
    assert features.sum() == pytest.approx(1.0) and (features >= 0).all()


def test_histogram_clips_padding_and_bone_into_end_bins():
    hu = np.array([-2048, -2048, -850, 1500])
    features = histogram_features(hu, bins=32, hu_range=(-1100, 500))
    assert features[0] == pytest.approx(0.5) and features[-1] == pytest.approx(0.25)
    assert features[(-850 + 1100) // 50] == pytest.approx(0.25)


def test_histogram_rejects_empty_or_bad_range():
    with pytest.raises(ValueError):
        histogram_features(np.array([]))
    with pytest.raises(ValueError):
        histogram_features(np.zeros(3), hu_range=(500, -1100))


def test_baseline_separates_an_obvious_difference(tmp_path):
    """The check has power: easy phantoms at full contrast with CT-3-like burden would be caught."""
    from utils.data.nifti_io import save_nifti

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(20):
        label = i % 2
        hu = rng.normal(-850 + 400 * label, 30, (16, 16, 8))  # lung, or dense lung
        hu[:4], hu[-4:, :, :2] = -1000.0, 600.0  # air and bone so it reads as CT
        path = tmp_path / f"scan_{i}.nii.gz"
        save_nifti(path, hu, np.diag([-1.0, -1.0, 8.0, 1.0]))
        paths.append(path)
        labels.append(label)
    mean, _ = histogram_baseline_accuracy(paths, labels, seed=0)
    assert mean >= 0.9


def test_baseline_needs_enough_scans_per_class(tmp_path):
    with pytest.raises(DataError, match="two classes"):
        histogram_baseline_accuracy([tmp_path / "a.nii.gz"] * 6, [0, 0, 0, 0, 0, 1])


def test_default_phantoms_do_not_give_the_label_away_by_histogram(tmp_path, capsys):
    """At the default difficulty the confounders keep a whole-volume histogram near chance."""
    write_dataset(tmp_path, 70, seed=0, config=PhantomConfig(size=64, difficulty=DIFFICULTIES["default"]),
                  progress=False)
    records = discover_scans(tmp_path)
    assert sorted(np.bincount([r.label for r in records]).tolist()) == [35, 35]
    mean, std = main(["--data-dir", str(tmp_path)])
    assert mean <= 0.70
    assert "accuracy" in capsys.readouterr().out
