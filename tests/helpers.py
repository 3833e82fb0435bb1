"""Helpers shared by the tests (import them with ``from helpers import ...``).

Not in conftest.py: two conftest.py files (tests/ and notebooks/) are both importable as the
module ``conftest``, so ``from conftest import ...`` could pick up the other one.

``load_script`` (a module of ``scripts/``), ``write_nifti`` (tiny NIfTI files of any array),
``toy_ct`` (a small chest-like int16 HU volume), ``DATA`` (the real scanner files), ``SHAPE`` and
``BlobVolumes`` (a tiny separable 3D problem for training tests).
"""
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset


DATA = Path(__file__).resolve().parent / "data"


def load_script(name: str):
    """The module ``scripts/<name>.py`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_nifti(path, array, affine=None):
    """Write ``array`` as-is (any dtype, any rank) to a NIfTI file; returns the path.

    Deliberately independent of ``utils.data.nifti_io.save_nifti`` so loader tests can write
    files the project's own writer refuses (2D, 4D, NaN, float).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else np.asarray(affine, float)), path)
    return path


def toy_ct(shape=(24, 20, 8), seed=0):
    """A small int16 chest-like HU volume (X, Y, Z): air outside, body, two dark lungs."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[x**2 + y**2 < 0.8] = 40.0
    hu[((x - 0.35) ** 2 + y**2 < 0.1) | ((x + 0.35) ** 2 + y**2 < 0.1)] = -850.0
    hu += rng.normal(0, 10, shape) + 30 * z
    return np.rint(hu).astype(np.int16)


SHAPE = (32, 32, 32)


class BlobVolumes(Dataset):
    """(1, 32, 32, 32) volumes: noise, plus a bright 8^3 blob at a random place in class 1."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 2
        self.images = rng.normal(0.3, 0.05, size=(n, 1, *SHAPE)).astype(np.float32)
        for i in np.flatnonzero(self.labels):
            h, w, d = rng.integers(0, 24, size=3)
            self.images[i, 0, h:h + 8, w:w + 8, d:d + 8] += 0.6

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.images[i]), "label": torch.tensor(self.labels[i]), "index": i,
                "path": f"scan_{i}"}
