"""HU windowing, scaling, exact resizing and flips."""
import numpy as np
import pytest
import torch

from utils.preprocessing import PreprocessConfig, apply_flips, preprocess, random_flip


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
            PreprocessConfig(target_shape=(256, 256, 64)).key()}
    assert len(keys) == 4
    assert base.key() == PreprocessConfig().key() and "/" not in base.key()


def test_preprocess_rejects_non_3d():
    with pytest.raises(ValueError, match="X, Y, Z"):
        preprocess(np.zeros((4, 4)), PreprocessConfig())


def test_flips_deterministic_and_content_preserving():
    volume = np.arange(1 * 4 * 5 * 3, dtype=np.float32).reshape(1, 4, 5, 3)
    draws = [random_flip(volume, np.random.default_rng(seed)) for seed in range(40)]
    again = [random_flip(volume, np.random.default_rng(seed)) for seed in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    seen = set()
    for out in draws:
        corner = int(out[0, 0, 0, 0])  # = 15 h + 3 w + d of the voxel now at the origin
        flip_h, flip_w = corner // 15 == 3, (corner // 3) % 5 == 4
        seen.add((flip_h, flip_w))
        expected = apply_flips(volume, (flip_h, flip_w))
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(volume, axis=None))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}
    assert all(np.array_equal(out[..., 0] % 3, volume[..., 0] % 3) for out in draws)  # D never flipped


def test_flips_on_tensors_match_numpy():
    volume = np.random.default_rng(1).random((1, 6, 5, 4)).astype(np.float32)
    for flips in [(False, False), (True, False), (False, True), (True, True)]:
        tensor = apply_flips(torch.from_numpy(volume), flips)
        assert isinstance(tensor, torch.Tensor)
        np.testing.assert_array_equal(tensor.numpy(), apply_flips(volume, flips))
    assert np.array_equal(apply_flips(volume, (True, False)), volume[:, ::-1])
