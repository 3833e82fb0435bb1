"""The scans a saliency figure shows (a stated rule), the phantoms' lesion masks on the input
grid, and the measured placement of the DCG's ROI boxes (utils.evaluation.showcase,
utils.data.phantom_masks, utils.evaluation.roi_anatomy)."""
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.data.cache import VolumeCache
from utils.data.dataset import CTDataset
from utils.data.discovery import discover_scans
from utils.data.nifti_io import save_nifti
from utils.data.phantom_masks import on_input_grid, phantom_lesion_mask, phantom_scan
from utils.data.phantoms import PhantomConfig, generate_phantom, write_dataset
from utils.data.preprocessing import PreprocessConfig
from utils.evaluation.roi_anatomy import PLACES, ScanAnatomy, box_shares, describe_boxes, place_of, summarise
from utils.evaluation.showcase import SHOWCASE_RULE, dcg_showcase, showcase_indices
from utils.training.dcg import cache_guidance

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("labels, p1, expected", [
    ([0, 0, 0, 1, 1, 1], [0.2, 0.05, 0.4, 0.7, 0.95, 0.6], [1, 4]),  # the most confident correct scan per class
    ([0, 0, 1, 1], [0.6, 0.8, 0.9, 0.7], [0, 2]),  # class 0 all wrong: its best-scored scan (least wrong)
    ([1, 1, 0, 0], [0.9, 0.9, 0.1, 0.1], [2, 0]),  # ties: the first; class order, not dataset order
])
def test_showcase_rule(labels, p1, expected):
    p1 = np.asarray(p1)
    assert showcase_indices(labels, np.stack([1 - p1, p1], 1)) == expected


def test_showcase_rule_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="same N > 0 scans"):
        showcase_indices([0, 1], np.full((3, 2), 0.5))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """A complete set of 4 phantoms of 32 x 32 in-plane: studies 1-2 normal, 3-4 abnormal."""
    root = tmp_path_factory.mktemp("phantoms") / "MosMedData"
    return root, write_dataset(root, 4, seed=0, config=PhantomConfig(size=32), progress=False)


PREP = [PreprocessConfig(target_shape=(32, 32, 16)),
        PreprocessConfig(target_shape=(32, 32, 16), target_spacing=(12.0, 12.0, 20.0))]


@pytest.mark.parametrize("prep", PREP, ids=["stretch", "spacing"])
def test_lesion_mask_is_drawn_again_on_the_cached_grid(phantoms, prep, tmp_path):
    root, paths = phantoms
    scan = phantom_scan(paths[2])
    assert (scan.seed, scan.study, scan.category) == (0, 3, 1)
    hu, _, info = generate_phantom(np.random.default_rng([0, 3]), 1, scan.config)
    affine = nib.load(paths[2]).affine  # the file's (float32 in the header), as the cache reads it
    # the mapping puts a volume exactly where the cache puts the scan itself
    np.testing.assert_array_equal(on_input_grid(hu, affine, prep), VolumeCache(tmp_path, prep).get(paths[2])[0])
    mask = phantom_lesion_mask(paths[2], prep)
    expected = on_input_grid(np.where(info["lesion_mask"], prep.hu_max, prep.hu_min), affine, prep) >= 0.5
    assert mask.shape == prep.target_shape and mask.any() and np.array_equal(mask, expected)
    normal = phantom_lesion_mask(paths[0], prep)  # a normal phantom has no lesion by construction
    assert normal.shape == prep.target_shape and not normal.any()
    assert not generate_phantom(np.random.default_rng([0, 1]), 0, scan.config)[2]["lesion_mask"].any()


def test_no_lesion_mask_where_it_is_unknown(phantoms, tmp_path):
    root, paths = phantoms
    assert phantom_lesion_mask(paths[2], None) is None  # no scan files (e.g. MedMNIST)
    copy = tmp_path / "real" / "CT-23" / "study_0003.nii.gz"
    copy.parent.mkdir(parents=True)
    shutil.copy(paths[2], copy)
    assert phantom_scan(copy) is None and phantom_lesion_mask(copy, PREP[0]) is None  # no sidecar: real data
    edited = tmp_path / "edited"
    shutil.copytree(root, edited)
    hu, affine, _ = generate_phantom(np.random.default_rng([0, 3]), 1, PhantomConfig(size=32))
    save_nifti(edited / "CT-23" / "study_0003.nii.gz", hu + 1, affine)
    assert phantom_scan(edited / "CT-23" / "study_0003.nii.gz") is not None
    assert phantom_lesion_mask(edited / "CT-23" / "study_0003.nii.gz", PREP[0]) is None  # not what was generated


def chest(shape=(24, 24, 4)):
    """A preprocessed (0..1) toy chest: air, an elliptic body, two dark lungs, a lesion in one."""
    h, w = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((h - 11.5) / 10) ** 2 + ((w - 11.5) / 8) ** 2 < 1
    lungs = (((h - 7) / 3.5) ** 2 + ((w - 11.5) / 5) ** 2 < 1) | (((h - 16) / 3.5) ** 2 + ((w - 11.5) / 5) ** 2 < 1)
    volume = np.where(body, 0.75, 0.0)
    volume = np.where(lungs, 0.1, volume)
    volume = np.repeat(volume[:, :, None], shape[2], axis=2)
    volume[0:24, 0:2, :] = 0.7  # a table below the body, apart from it
    lesion = np.zeros(shape, dtype=bool)
    lesion[15:18, 10:13, 1:3] = True
    volume[lesion] = 0.7  # a consolidation: dense, but lung
    return volume, lesion


def test_box_places_and_lesion_overlap():
    volume, lesion = chest()
    anatomy = ScanAnatomy.of(volume, lesion)
    assert not anatomy.body[:, 0:2].any()  # the table is not the body
    assert anatomy.lung[16, 11, 1]  # the consolidation counts as lung
    boxes = np.array([[14, 9, 0, 18, 13, 4],  # over the lesion, in the lung
                      [0, 20, 0, 4, 24, 4],  # the corner: air
                      [11, 9, 0, 13, 14, 4]])  # between the lungs: tissue
    shares = box_shares(boxes, anatomy)
    assert place_of(shares) == ["lung", "air outside the body", "tissue outside the lungs"]
    np.testing.assert_allclose(shares[:, 1:].sum(1), 1.0)
    assert shares[0, 0] == pytest.approx(18 / 64) and shares[1, 0] == 0
    assert describe_boxes(shares) == ("ROI boxes 0-2: 1 touches the lesion; mostly in lung (1), tissue outside "
                                      "the lungs (1), air outside the body (1)")
    assert "lesion" not in describe_boxes(box_shares(boxes, ScanAnatomy.of(volume)))  # unknown lesion
    assert "lesion" not in describe_boxes(shares, has_lesion=False)  # a normal scan

    placement = summarise([boxes, boxes[[1, 1, 2]]], [anatomy, ScanAnatomy.of(volume, np.zeros_like(lesion))])
    assert placement.n_boxes == 6
    assert placement.places == {"lung": 1, "tissue outside the lungs": 2, "air outside the body": 3}
    assert sum(placement.voxel_shares.values()) == pytest.approx(1.0)
    assert placement.body_lesion_share == pytest.approx(lesion.sum() / anatomy.body.sum())
    assert placement.distinct_boxes == 3 and placement.lesion_scans == 1 and placement.on_lesion == 1
    assert placement.box_lesion_share == pytest.approx(18 / (64 + 64 + 40))
    assert placement.lung_lesion_share == pytest.approx(lesion.sum() / anatomy.lung.sum())
    assert "1 of 3 boxes touch it" in "\n".join(placement.lines("validation"))
    assert set(placement.places) == set(PLACES)


def test_dcg_showcase_on_phantoms(phantoms, tmp_path):
    root, _ = phantoms
    prep = PreprocessConfig(target_shape=(32, 32, 16))
    dataset = CTDataset(discover_scans(root), VolumeCache(tmp_path, prep))
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 16))).eval()
    guidance = cache_guidance(model, dataset, torch.device("cpu"), batch_size=2, progress=False)
    shown = dcg_showcase(dataset, guidance, ["Normal", "COVID-19"], 1, prep)
    assert isinstance(shown.figure, Figure)
    assert sorted(dataset.labels[shown.picks].tolist()) == [0, 1]  # one scan of each class
    assert shown.picks == showcase_indices(dataset.labels, guidance.fused_probs.numpy())
    text = "\n".join(shown.lines)
    assert SHOWCASE_RULE in text and "study_000" in text and "ROI boxes 0-1:" in text
    assert shown.placement.n_scans == 4 and shown.placement.lesion_scans == 2
    assert "validation split, 4 scans x 2 ROI boxes = 8 boxes; mostly in: lung" in text
    none = dcg_showcase(dataset, guidance, ["Normal", "COVID-19"], 1, None)  # no scan files: no anatomy
    assert none.placement is None and "ROI boxes" not in "\n".join(none.lines)


def test_report_figure_outlines_the_lesion_and_says_where_the_boxes_lie(tmp_path, monkeypatch):
    from utils.evaluation import run_figures
    from utils.evaluation.visualization import model_figures
    captured = []
    real = model_figures.plot_saliency_overlay

    def spy(volume, saliency, boxes, **kwargs):
        captured.append(kwargs)
        return real(volume, saliency, boxes, **kwargs)

    monkeypatch.setattr(model_figures, "plot_saliency_overlay", spy)
    torch.manual_seed(0)
    model = DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 16))).eval()
    volume, lesion = (np.pad(a, ((4, 4), (4, 4), (6, 6))) for a in chest())  # (32, 32, 16), air around
    volumes = [volume[None].astype(np.float32)] * 2
    run_figures.write_model_figures(model, volumes, ["a.nii.gz", "b.nii.gz"], tmp_path, class_names=["N", "C"],
                                    labels=[0, 1], num_samples=1, lesion_masks=[None, lesion])
    assert captured[0]["lesion_mask"] is None and captured[1]["lesion_mask"] is lesion
    assert "ROI boxes 0-1: mostly in" in captured[0]["title"] and "lesion" not in captured[0]["title"].split("\n")[1]
    assert "the lesion; mostly in" in captured[1]["title"] and "(p = 0." in captured[1]["title"]
    with pytest.raises(ValueError, match="lesion_masks has 1 entries for 2 volumes"):
        run_figures.write_model_figures(model, volumes, ["a", "b"], tmp_path, num_samples=1, lesion_masks=[None])
