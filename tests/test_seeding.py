"""Tests of utils.seeding: reproducible seeding, device choice, AMP switch."""
import random
import warnings

import numpy as np
import pytest
import torch

from utils.seeding import DEVICE_ENV_VAR, amp_enabled, pick_device, seed_everything


@pytest.fixture(autouse=True)
def restore_global_torch_flags():
    """seed_everything changes process-wide flags: put them back for the other tests."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cpu_state = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    torch.set_rng_state(cpu_state)


def draws(generator):
    return torch.rand(5), np.random.rand(5), random.random(), torch.rand(5, generator=generator)


def test_same_seed_same_numbers_from_every_rng():
    first = draws(seed_everything(123))
    second = draws(seed_everything(123))
    other = draws(seed_everything(124))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])
    assert not torch.equal(first[0], other[0]) and not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_flags(deterministic):
    seed_everything(0, deterministic=deterministic)
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.backends.cudnn.deterministic == deterministic
    assert torch.backends.cudnn.benchmark == (not deterministic)


def put_without_a_deterministic_kernel():
    """``Tensor.put_`` (accumulate=False) has no deterministic kernel on the CPU either: under
    ``warn_only`` it warns as the 3D pooling backwards do on CUDA; the filter change after it
    resets Python's once-per-place registry, as scikit-learn's metrics do every validation."""
    torch.zeros(4).put_(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    warnings.filterwarnings("ignore", message="a filter that matches nothing")


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_no_deterministic_kernel_warning_is_silenced_only_in_deterministic_mode(deterministic):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        torch.use_deterministic_algorithms(True, warn_only=True)
        for _ in range(3):
            put_without_a_deterministic_kernel()
        assert [str(w.message)[:4] for w in seen] == ["put_"] * 3  # control: one per call
        seen.clear()
        seed_everything(0, deterministic=deterministic)
        torch.use_deterministic_algorithms(True, warn_only=True)
        for _ in range(3):
            put_without_a_deterministic_kernel()
        assert len(seen) == (0 if deterministic else 3)
    seed_everything(0)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "7"])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        seed_everything(seed)


def test_pick_device(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV_VAR, raising=False)
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("auto") == auto
    monkeypatch.setenv(DEVICE_ENV_VAR, "cpu")
    assert pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("gpu0")


def test_env_var_is_honoured_and_validated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(DEVICE_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{DEVICE_ENV_VAR}='cuda' asks for CUDA"):
        pick_device()
    assert pick_device("cpu") == torch.device("cpu")  # an explicit argument wins over the variable


@pytest.mark.parametrize(
    "device, expected", [("cpu", False), (torch.device("cpu"), False), ("cuda", True), ("cuda:0", True)]
)
def test_amp_only_on_cuda(device, expected):
    assert amp_enabled(device) is expected
