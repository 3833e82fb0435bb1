"""CTDataset items, per-(seed, epoch, index) augmentation (left-right flips only, optional
intensity jitter), paired hi-res flips, and the training loader's seeded order over it."""
import numpy as np
import pytest
import torch
from helpers import toy_ct, write_nifti

from utils.data.cache import VolumeCache
from utils.data.dataset import CTDataset
from utils.data.discovery import ScanRecord
from utils.data.nifti_io import load_scan
from utils.data.preprocessing import AP_AXIS, LR_AXIS, PreprocessConfig
from utils.training.loop import make_epoch_loader


@pytest.fixture
def records(tmp_path):
    out = []
    for k in range(4):
        path = write_nifti(tmp_path / "data" / f"study_{k:04d}.nii.gz", toy_ct(seed=k))
        out.append(ScanRecord(path, k % 2, path.name[:-7], "CT-0" if k % 2 == 0 else "CT-23"))
    return out


@pytest.fixture
def cache(tmp_path):
    return VolumeCache(tmp_path / "processed", PreprocessConfig(target_shape=(16, 16, 8)))


def test_item_layout(records, cache):
    item = CTDataset(records, cache)[1]
    assert item["image"].shape == (1, 16, 16, 8) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    assert item["index"] == 1 and item["path"] == str(records[1].path)
    np.testing.assert_array_equal(item["image"].numpy(), cache.get(records[1].path))
    assert "image_hires" not in item


def test_no_augmentation_serves_the_cached_volume(records, cache):
    dataset = CTDataset(records, cache, augment=False)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        np.testing.assert_array_equal(dataset[0]["image"].numpy(), cache.get(records[0].path))


def test_augmentation_deterministic_per_seed_epoch_index(records, cache):
    a = CTDataset(records, cache, augment=True, seed=5)
    b = CTDataset(records, cache, augment=True, seed=5)
    views = []
    for epoch in range(8):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        torch.testing.assert_close(a[2]["image"], b[2]["image"])
        views.append(a[2]["image"])
    distinct = {tuple(v.flatten()[:64].tolist()) for v in views}
    assert len(distinct) > 1  # epochs draw different flips
    base = torch.from_numpy(cache.get(records[2].path))
    for view in views:  # every view is the volume or its left-right (H) mirror
        assert torch.equal(view, base) or torch.equal(view, torch.flip(base, (1,)))


def test_hires_gets_the_same_flips(records, cache, tmp_path):
    hires = VolumeCache(tmp_path / "processed", PreprocessConfig(target_shape=(32, 32, 8)))
    dataset = CTDataset(records, cache, augment=True, seed=0, hires_cache=hires)
    low_base = torch.from_numpy(cache.get(records[0].path))
    high_base = torch.from_numpy(hires.get(records[0].path))
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["image_hires"].shape == (1, 32, 32, 8)
        for dims in [(), (1,)]:
            low = torch.flip(low_base, dims) if dims else low_base
            if torch.equal(item["image"], low):
                high = torch.flip(high_base, dims) if dims else high_base
                assert torch.equal(item["image_hires"], high)
                seen.add(dims)
    assert seen == {(), (1,)}


def test_epoch_loader_order_fixed_by_seed_and_epoch(records, cache):
    """The training loader (utils.training.loop.make_epoch_loader) over a CTDataset: the
    order is a function of (seed, epoch), every item comes once, and the epoch reaches
    the dataset's augmentation."""
    dataset = CTDataset(records, cache, augment=True)

    def order(seed, epoch):
        return [int(i) for batch in make_epoch_loader(dataset, 2, seed, epoch) for i in batch["index"]]

    assert order(3, 0) == order(3, 0) and sorted(order(3, 0)) == [0, 1, 2, 3]
    assert len({tuple(order(seed, 0)) for seed in range(6)}) > 1
    assert len({tuple(order(3, epoch)) for epoch in range(6)}) > 1
    batch = next(iter(make_epoch_loader(dataset, 2, 0, epoch=5)))
    assert dataset.epoch == 5
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["label"].dtype == torch.int64


def test_anterior_posterior_axis_is_never_flipped(tmp_path):
    """The canonical (RAS+) axes: H = X (Left -> Right) may be mirrored, W = Y (Posterior ->
    Anterior) never: a scan with a bright 'spine' at the back and a bright spot on the
    patient's left keeps the spine at the back in every augmented view."""
    hu = np.full((16, 16, 8), -1000, dtype=np.int16)
    hu[6:10, 0:3, :] = 400  # spine: posterior = low Y
    hu[1:3, 8:10, :] = 400  # a lesion on the patient's left = low X
    path = write_nifti(tmp_path / "data" / "study_0000.nii.gz", hu)
    assert load_scan(path).hu[7, 1, 0] == 400  # identity affine: already canonical
    assert (LR_AXIS, AP_AXIS) == (-3, -2)
    cache = VolumeCache(tmp_path / "processed", PreprocessConfig(target_shape=(16, 16, 8), anti_alias=False))
    dataset = CTDataset([ScanRecord(path, 0, "study_0000", "CT-0")], cache, augment=True, seed=1)
    sides = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        image = dataset[0]["image"][0]  # (H, W, D)
        posterior, anterior = image[:, :3].sum(), image[:, -3:].sum()
        assert posterior > 0 and anterior == 0, f"epoch {epoch}: anterior-posterior flip (spine on top)"
        sides.add("left" if image[:3, 8:10].sum() > 0 else "right")
    assert sides == {"left", "right"}  # left-right mirrors are drawn


def test_intensity_jitter_is_off_by_default_and_deterministic(records, cache):
    plain = CTDataset(records, cache, augment=True, seed=3)
    jittered = CTDataset(records, cache, augment=True, seed=3, intensity_jitter=0.1)
    again = CTDataset(records, cache, augment=True, seed=3, intensity_jitter=0.1)
    base = torch.from_numpy(cache.get(records[1].path))
    changed = 0
    for epoch in range(4):
        for d in (plain, jittered, again):
            d.set_epoch(epoch)
        flips, scale, shift = plain.augmentation(1)
        assert (scale, shift) == (1.0, 0.0)
        j_flips, j_scale, j_shift = jittered.augmentation(1)
        assert j_flips == flips and 0.9 <= j_scale <= 1.1 and -0.1 <= j_shift <= 0.1
        view = jittered[1]["image"]
        torch.testing.assert_close(view, again[1]["image"])
        assert view.min() >= 0 and view.max() <= 1 and view.dtype == torch.float32
        source = torch.flip(base, (1,)) if flips[0] else base
        torch.testing.assert_close(view, torch.clamp(source * j_scale + j_shift, 0, 1))
        changed += not torch.equal(view, source)
    assert changed == 4
    np.testing.assert_array_equal(CTDataset(records, cache, intensity_jitter=0.1)[1]["image"].numpy(),
                                  base.numpy())  # no augmentation: no jitter
    with pytest.raises(ValueError, match="intensity_jitter"):
        CTDataset(records, cache, intensity_jitter=-0.1)
