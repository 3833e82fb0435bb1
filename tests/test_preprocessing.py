"""HU windowing, scaling, exact resizing, anti-aliasing, target spacing and flips."""
import numpy as np
import pytest
import torch

from utils.data.preprocessing import PreprocessConfig, anti_alias_sigma, apply_flips, preprocess, sample_flips


def test_clip_and_scale_values():
    hu = np.array([-3000, -1000, -300, 400, 2000, 50], dtype=np.float32).reshape(1, 1, 6)
    hu = np.broadcast_to(hu, (2, 2, 6))
    out = preprocess(hu, PreprocessConfig(hu_min=-1000, hu_max=400, target_shape=(2, 2, 6)))
    np.testing.assert_allclose(out[0, 0, 0], [0, 0, 0.5, 1, 1, 0.75], atol=1e-6)


@pytest.mark.parametrize("in_shape, target", [
    ((17, 23, 5), (16, 16, 8)),
    ((512, 511, 43), (128, 128, 64)),
    ((7, 129, 3), (128, 128, 64)),
    ((97, 101, 113), (33, 65, 7)),
    ((1, 1, 1), (4, 4, 4)),
])
def test_exact_output_shape(in_shape, target):
    hu = np.random.default_rng(0).uniform(-1200, 800, in_shape).astype(np.float32)
    out = preprocess(hu, PreprocessConfig(target_shape=target))
    assert out.shape == (1, *target) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_resize_keeps_a_linear_ramp():
    ramp = np.broadcast_to(np.linspace(-1000, 400, 11, dtype=np.float32)[:, None, None], (11, 4, 4))
    out = preprocess(ramp, PreprocessConfig(target_shape=(21, 4, 4)))
    np.testing.assert_allclose(out[0, :, 0, 0], np.linspace(0, 1, 21), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(hu_min=400, hu_max=-1000), dict(hu_min=0, hu_max=0),
                                    dict(target_shape=(128, 0, 64)), dict(target_shape=(128, 128)),
                                    dict(target_shape=(128.5, 128, 64))])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)


def test_config_key_changes_with_every_field():
    base = PreprocessConfig()
    keys = {base.key(), PreprocessConfig(hu_min=-1100).key(), PreprocessConfig(hu_max=300).key(),
            PreprocessConfig(target_shape=(256, 256, 64)).key(), PreprocessConfig(anti_alias=False).key(),
            PreprocessConfig(target_spacing=(1.5, 1.5, 2.5)).key(),
            PreprocessConfig(target_spacing=(1.5, 1.5, 3)).key()}
    assert len(keys) == 7
    assert base.key() == PreprocessConfig().key() and "/" not in base.key()
    # the seed's settings keep the cache folder they always had
    assert PreprocessConfig(anti_alias=False).key() == "hu-1000_400_128x128x64"


def test_config_dict_round_trip_and_legacy_dicts():
    for config in (PreprocessConfig(), PreprocessConfig(anti_alias=False, target_spacing=(0.8, 0.8, 2))):
        assert PreprocessConfig(**config.as_dict()) == config == PreprocessConfig.from_dict(config.as_dict())
    legacy = {"hu_min": -1000.0, "hu_max": 400.0, "target_shape": [64, 64, 32]}  # written before anti_alias
    assert PreprocessConfig.from_dict(legacy) == PreprocessConfig(target_shape=(64, 64, 32), anti_alias=False)
    with pytest.raises(ValueError, match="target_spacing"):
        PreprocessConfig(target_spacing=(1.0, 0.0, 1.0))


def test_anti_alias_sigma_rule():
    assert anti_alias_sigma((0.25, 0.5, 1.0, 2.0)) == (1.5, 0.5, 0.0, 0.0)


def test_anti_aliasing_suppresses_a_checkerboard():
    index = np.indices((64, 64, 64)).sum(0)
    hu = np.where(index % 2 == 0, -1000.0, 400.0).astype(np.float32)  # 0 / 1 after scaling: Nyquist texture
    aliased = preprocess(hu, PreprocessConfig(target_shape=(16, 16, 16), anti_alias=False))
    smooth = preprocess(hu, PreprocessConfig(target_shape=(16, 16, 16), anti_alias=True))
    assert aliased.var() > 0.01
    assert smooth.var() < aliased.var() / 100
    np.testing.assert_allclose(smooth.mean(), 0.5, atol=0.02)  # the mean grey level is kept


def test_anti_aliasing_leaves_upsampling_unchanged():
    hu = np.random.default_rng(0).uniform(-1000, 400, (8, 9, 5)).astype(np.float32)
    for target in [(16, 18, 10), (8, 9, 5)]:
        np.testing.assert_array_equal(preprocess(hu, PreprocessConfig(target_shape=target, anti_alias=True)),
                                      preprocess(hu, PreprocessConfig(target_shape=target, anti_alias=False)))


@pytest.mark.parametrize("anti_alias", [False, True])
def test_target_spacing_puts_a_feature_at_its_mm_position(anti_alias):
    # 40 x 40 x 10 voxels of 0.5 x 0.5 x 2 mm = a 20 mm cube; a bright block at
    # x 10..12 mm, y 4..6 mm, z 4..6 mm from the scan's corner (centre 11, 5, 5 mm)
    hu = np.full((40, 40, 10), -1000.0, dtype=np.float32)
    hu[20:24, 8:12, 2] = 400.0
    config = PreprocessConfig(target_shape=(24, 24, 24), target_spacing=(1.0, 1.0, 1.0), anti_alias=anti_alias)
    out = preprocess(hu, config, spacing=(0.5, 0.5, 2.0))[0]
    assert out.shape == (24, 24, 24)
    # a 24 mm grid centred on the 20 mm scan: 2 mm of air on each side, so the block's centre
    # sits at 13, 7, 7 mm from the output's corner, i.e. at voxel index 12.5, 6.5, 6.5
    centre = np.array([(out * g).sum() / out.sum() for g in np.indices(out.shape)])
    np.testing.assert_allclose(centre, [12.5, 6.5, 6.5], atol=0.15)
    assert out[:2].max() == 0 and out[-2:].max() == 0 and out[:, :2].max() == 0 and out[..., -2:].max() == 0
    # the block has its physical size: about 2 x 2 x 2 mm = 8 voxels of 1 mm^3 of full intensity
    np.testing.assert_allclose(out.sum(), 8.0, rtol=0.1)


def test_target_spacing_crops_a_large_scan_around_its_centre():
    hu = np.full((100, 100, 20), -1000.0, dtype=np.float32)
    hu[48:52, 48:52, 9:11] = 400.0  # the centre (2 x 2 x 2 mm)
    hu[:5] = 400.0  # far off-centre: cropped away
    out = preprocess(hu, PreprocessConfig(target_shape=(16, 16, 8), target_spacing=(1.0, 1.0, 1.0)),
                     spacing=(0.5, 0.5, 1.0))[0]
    assert out.max() > 0.4 and out[0].max() == 0
    centre = np.array([(out * g).sum() / out.sum() for g in np.indices(out.shape)])
    np.testing.assert_allclose(centre, [7.5, 7.5, 3.5], atol=0.15)


def test_target_spacing_needs_the_spacing():
    with pytest.raises(ValueError, match="spacing"):
        preprocess(np.zeros((8, 8, 8)), PreprocessConfig(target_shape=(8, 8, 8), target_spacing=(1, 1, 1)))


def test_preprocess_rejects_non_3d():
    with pytest.raises(ValueError, match="X, Y, Z"):
        preprocess(np.zeros((4, 4)), PreprocessConfig())


def test_flips_deterministic_and_content_preserving():
    volume = np.arange(1 * 4 * 5 * 3, dtype=np.float32).reshape(1, 4, 5, 3)
    draws = [apply_flips(volume, sample_flips(np.random.default_rng(seed))) for seed in range(40)]  # as CTDataset
    again = [apply_flips(volume, sample_flips(np.random.default_rng(seed))) for seed in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    seen = set()
    for out in draws:
        corner = int(out[0, 0, 0, 0])  # = 15 h + 3 w + d of the voxel now at the origin
        flip_h, flip_w = corner // 15 == 3, (corner // 3) % 5 == 4
        seen.add((flip_h, flip_w))
        expected = apply_flips(volume, (flip_h, flip_w))
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(volume, axis=None))
    # left-right (H) mirrors only: the anterior-posterior axis W is never flipped
    assert seen == {(False, False), (True, False)}
    assert all(np.array_equal(out[..., 0] % 3, volume[..., 0] % 3) for out in draws)  # D never flipped


def test_flips_on_tensors_match_numpy():
    volume = np.random.default_rng(1).random((1, 6, 5, 4)).astype(np.float32)
    for flips in [(False, False), (True, False), (False, True), (True, True)]:
        tensor = apply_flips(torch.from_numpy(volume), flips)
        assert isinstance(tensor, torch.Tensor)
        np.testing.assert_array_equal(tensor.numpy(), apply_flips(volume, flips))
    assert np.array_equal(apply_flips(volume, (True, False)), volume[:, ::-1])
