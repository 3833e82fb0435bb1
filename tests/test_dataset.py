"""CTDataset items, per-(seed, epoch, index) augmentation, paired hi-res flips, seeded loader."""
import numpy as np
import pytest
import torch
from helpers import toy_ct, write_nifti

from utils.cache import VolumeCache
from utils.dataset import CTDataset, make_loader
from utils.discovery import ScanRecord
from utils.preprocessing import PreprocessConfig


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
    for view in views:  # every view is one of the four flips of the same volume
        assert any(torch.equal(view, torch.flip(base, dims)) if dims else torch.equal(view, base)
                   for dims in [(), (1,), (2,), (1, 2)])


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
        for dims in [(), (1,), (2,), (1, 2)]:
            low = torch.flip(low_base, dims) if dims else low_base
            if torch.equal(item["image"], low):
                high = torch.flip(high_base, dims) if dims else high_base
                assert torch.equal(item["image_hires"], high)
                seen.add(dims)
    assert len(seen) >= 3


def test_loader_order_fixed_by_seed(records, cache):
    dataset = CTDataset(records, cache)
    order = [[int(i) for i in batch["index"]] for batch in make_loader(dataset, 2, shuffle=True, seed=3)]
    again = [[int(i) for i in batch["index"]] for batch in make_loader(dataset, 2, shuffle=True, seed=3)]
    assert order == again and sorted(sum(order, [])) == [0, 1, 2, 3]
    batch = next(iter(make_loader(dataset, 2, shuffle=False)))
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["label"].tolist() == [0, 1]
    orders = {tuple(sum([[int(i) for i in b["index"]] for b in make_loader(dataset, 2, True, seed)], []))
              for seed in range(6)}
    assert len(orders) > 1
