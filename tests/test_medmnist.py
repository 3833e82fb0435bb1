"""MedMNIST 3D ``.npz`` files as a data source: official split, scaling, resizing, class count,
the CTDataset item interface, one-line errors, and the real AdrenalMNIST3D copy in shared/."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data.dataset import CTDataset
from utils.errors import DataError
from utils.data.medmnist import MedMNISTDataset, class_names_for, dataset_name, load_medmnist
from utils.experiment import prepare_experiment
from utils.pipeline import build_model
from utils.training.profiles import get_profile

REPO = Path(__file__).resolve().parents[1]
ADRENAL = REPO.parent / "shared" / "data" / "medmnist" / "adrenalmnist3d.npz"
SIZES = {"train": 10, "val": 4, "test": 5}


def synthetic_arrays(side=28, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, side, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).reshape(n, 1).astype(np.int64)
    return arrays


def write_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def npz(tmp_path):
    return write_npz(tmp_path / "data" / "toymnist3d.npz", **synthetic_arrays())


def smoke(**overrides):
    return get_profile("smoke", input_shape=(32, 32, 32), num_workers=0, **overrides)


def test_prepare_experiment_uses_the_official_split(tmp_path, npz):
    exp = prepare_experiment(smoke(), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)
    assert exp.layout == "medmnist" and exp.num_classes == 3
    assert exp.class_names == ["class 0", "class 1", "class 2"]
    assert {s: len(exp.splits[s]) for s in SIZES} == SIZES and len(exp.records) == 19
    raw = np.load(npz)
    for split, n in SIZES.items():
        dataset = exp.datasets[split]
        assert isinstance(dataset, CTDataset) and len(dataset) == n
        np.testing.assert_array_equal(dataset.labels, raw[f"{split}_labels"][:, 0])
        assert dataset.labels.dtype == np.int64
    rows = list(csv.DictReader((tmp_path / "out" / "splits.csv").open()))
    assert rows[0] == {"path": "toymnist3d.npz#train/0", "label": "0", "split": "train"}
    assert [r["path"] for r in rows if r["split"] == "test"] == [f"toymnist3d.npz#test/{i}" for i in range(5)]
    assert [int(r["label"]) for r in rows if r["split"] == "val"] == [0, 1, 2, 0]

    item = exp.datasets["test"][3]
    assert set(item) == {"image", "label", "index", "path"}
    assert item["image"].shape == (1, 32, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert int(item["label"]) == 0 and item["index"] == 3 and item["path"].endswith("toymnist3d.npz#test/3")
    assert exp.datasets["test"].records[3].path == Path(item["path"])
    # x / 255 then trilinear 28 -> 32: the mean grey level is kept
    np.testing.assert_allclose(item["image"].mean().item(), raw["test_images"][3].mean() / 255, atol=0.01)
    source = exp.meta["data_source"]
    assert source["kind"] == "medmnist" and source["file"] == "toymnist3d.npz" and source["num_classes"] == 3
    assert source["split_sizes"] == SIZES and exp.meta["class_names"] == exp.class_names

    # the split is frozen: a second preparation reuses (and checks) the manifest
    again = prepare_experiment(smoke(), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)
    assert [r.path for r in again.splits["val"]] == [r.path for r in exp.splits["val"]]
    # models get the data's class count
    assert build_model(exp).config.num_classes == 3


def test_train_augmentation_is_ctdatasets(tmp_path, npz):
    exp = prepare_experiment(smoke(), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)
    train, plain = exp.datasets["train"], exp.datasets["train_plain"]
    assert isinstance(train, MedMNISTDataset) and train.augment and not plain.augment
    views = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        image, base = train[1]["image"], plain[1]["image"]
        assert torch.equal(image, base) or torch.equal(image, torch.flip(base, (1,)))  # H only, never W
        views.add(torch.equal(image, base))
    assert views == {True, False}
    assert torch.equal(plain[1]["image"], plain[1]["image"])  # the in-memory copy is never modified


def test_64_side_and_known_class_names(tmp_path):
    path = write_npz(tmp_path / "vesselmnist3d_64.npz", **synthetic_arrays(side=64, num_classes=2))
    data = load_medmnist(path, (32, 32, 32))
    assert data.source_shape == (64, 64, 64) and data.num_classes == 2
    assert data.class_names == ["vessel", "aneurysm"] and data.name == "vesselmnist3d"
    assert data.volumes.get(data.splits["train"][0].path).shape == (1, 32, 32, 32)
    assert dataset_name("organmnist3d.npz") == "organmnist3d" and len(class_names_for("organmnist3d", 11)) == 11
    assert class_names_for("adrenalmnist3d", 2) == ["normal", "adrenal mass"]
    assert class_names_for("adrenalmnist3d", 3) == ["class 0", "class 1", "class 2"]


def test_same_size_keeps_values_exactly(tmp_path):
    arrays = synthetic_arrays(side=32)
    data = load_medmnist(write_npz(tmp_path / "x.npz", **arrays), (32, 32, 32))
    np.testing.assert_allclose(data.volumes.get(data.splits["val"][2].path)[0],
                               arrays["val_images"][2].astype(np.float32) / 255, atol=1e-7)


def test_the_data_class_count_reaches_every_part_of_the_model():
    config = smoke().model_config("cpu", num_classes=7)
    assert (config.dcg.num_classes, config.prior.num_classes, config.denoiser.num_classes) == (7, 7, 7)


def bad_arrays(kind):
    arrays = synthetic_arrays()
    if kind == "missing key":
        del arrays["val_labels"]
    elif kind == "3d images":
        arrays["test_images"] = arrays["test_images"][:, 0]
    elif kind == "label count":
        arrays["train_labels"] = arrays["train_labels"][:-1]
    elif kind == "float images":
        arrays["train_images"] = arrays["train_images"].astype(np.float32) / 255
    elif kind == "other side":
        arrays["val_images"] = np.zeros((4, 28, 28, 20), dtype=np.uint8)
    elif kind == "one class":
        for split in SIZES:
            arrays[f"{split}_labels"] = np.zeros_like(arrays[f"{split}_labels"])
    return arrays


@pytest.mark.parametrize("kind, message", [
    ("missing key", "missing key.*val_labels"), ("3d images", "test_images must be \\(N, H, W, D\\)"),
    ("label count", "train_labels must be \\(10, 1\\)"), ("float images", "uint8"),
    ("other side", "val_images has volumes"), ("one class", "at least 2 classes")])
def test_bad_files_give_one_line_errors(tmp_path, kind, message):
    path = write_npz(tmp_path / "bad.npz", **bad_arrays(kind))
    with pytest.raises(DataError, match=message) as info:
        prepare_experiment(smoke(), tmp_path / "out", data_dir=path, device="cpu", verbose=False)
    assert "\n" not in str(info.value) and str(path.resolve()) in str(info.value)


def test_unreadable_or_missing_file(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    for path, message in [(garbage, "cannot read"), (tmp_path / "absent.npz", "not found")]:
        with pytest.raises(DataError, match=message) as info:
            load_medmnist(path, (32, 32, 32))
        assert "\n" not in str(info.value) and path.name in str(info.value)


def test_roi_scale_is_refused(tmp_path, npz):
    with pytest.raises(DataError, match="roi_scale=2") as info:
        prepare_experiment(smoke(roi_scale=2), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)
    assert "\n" not in str(info.value)


def test_a_manifest_of_another_split_is_refused(tmp_path, npz):
    prepare_experiment(smoke(), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)
    manifest = tmp_path / "out" / "splits.csv"
    manifest.write_text(manifest.read_text().replace("toymnist3d.npz#val/0,0,val", "toymnist3d.npz#val/0,0,train"))
    with pytest.raises(DataError, match="official split"):
        prepare_experiment(smoke(), tmp_path / "out", data_dir=npz, device="cpu", verbose=False)


@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"{ADRENAL} absent (shared/ is not beside the repository)")
def test_real_adrenalmnist3d_official_split(tmp_path):
    exp = prepare_experiment(smoke(), tmp_path / "out", data_dir=ADRENAL, device="cpu", verbose=False)
    counts = {s: np.bincount(exp.datasets[s].labels, minlength=2).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [929, 259], "val": [76, 22], "test": [229, 69]}
    assert exp.num_classes == 2 and exp.class_names == ["normal", "adrenal mass"]
    assert exp.meta["data_source"]["md5"] == "bbd3c5a5576322bc4cdfea780653b1ce"
    assert exp.meta["data_source"]["source_shape"] == [28, 28, 28]
    image = exp.datasets["test"][17]["image"]
    assert image.shape == (1, 32, 32, 32) and 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    rows = (tmp_path / "out" / "splits.csv").read_text().splitlines()
    assert len(rows) == 1 + 1188 + 98 + 298
    label = int(np.load(ADRENAL)["test_labels"][17, 0])
    assert f"adrenalmnist3d.npz#test/17,{label},test" in rows
