"""Where the DCG's ROI boxes lie: on a lesion, in the lungs, in other tissue, or in the air
outside the body. A measurement of the boxes the model chose, not a change to them.

Masks on the network input's grid (H, W, D), from the preprocessed volume in [0, 1] (0 = -1000
HU, 1 = 400 HU, ``PreprocessConfig``'s window) and, where known, a lesion mask
(``utils.data.phantom_masks``):

* **body**: in each axial slice, the largest connected region denser than -500 HU with its holes
  filled (the lungs are holes inside the chest wall; the scanner table and blankets are other,
  smaller regions); **air** is everything outside it;
* **lung**: voxels inside the body below -500 HU (lungs and airways), joined with the lesion
  mask (a consolidation inside the lung is denser than -500 HU but is lung); an estimate that
  also works for real CT;
* **lesion**: the ground-truth mask of a phantom; unknown (None) for real scans.

A box (half-open voxel ranges on the input grid: ``boxes_in_input`` of the DCG's ROI boxes) is
placed where most of its voxels are (lung, other tissue or air), and "on a lesion" when any of
its voxels is lesion. :func:`summarise` pools the boxes of many scans and compares the share of
box voxels that are lesion with the lesions' share of the body (what boxes placed at random in
the body would hold) and of the lungs: boxes that sought the lesions would hold far more.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BODY_HU = -500.0
"""Denser than this is tissue (the body, the table); below it air or lung."""
PLACES = ("lung", "tissue outside the lungs", "air outside the body")


def _scaled(hu: float, window: tuple[float, float]) -> float:
    lo, hi = window
    return (hu - lo) / (hi - lo)


def body_mask(volume: np.ndarray, window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """(H, W, D) bool: per axial slice the largest region denser than ``BODY_HU``, holes filled.

    Args:
        volume: (H, W, D) preprocessed to [0, 1] over ``window`` (HU).
    """
    dense = np.asarray(volume) > _scaled(BODY_HU, window)
    body = np.zeros(dense.shape, dtype=bool)
    for k in range(dense.shape[2]):
        regions, n = ndimage.label(dense[:, :, k])
        if n:
            largest = 1 + int(np.argmax(ndimage.sum_labels(dense[:, :, k], regions, range(1, n + 1))))
            body[:, :, k] = ndimage.binary_fill_holes(regions == largest)
    return body


@dataclass(frozen=True)
class ScanAnatomy:
    """(H, W, D) masks of one scan on the input grid (module docstring); ``lesion`` None = unknown."""

    body: np.ndarray
    lung: np.ndarray
    lesion: np.ndarray | None

    @classmethod
    def of(cls, volume: np.ndarray, lesion: np.ndarray | None = None,
           window: tuple[float, float] = (-1000.0, 400.0)) -> "ScanAnatomy":
        """The masks of a preprocessed (H, W, D) volume and its optional lesion mask."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"volume must be (H, W, D), got shape {volume.shape}")
        if lesion is not None and lesion.shape != volume.shape:
            raise ValueError(f"lesion mask {lesion.shape} must have the volume's shape {volume.shape}")
        body = body_mask(volume, window)
        lung = body & (volume < _scaled(BODY_HU, window))
        if lesion is not None:
            lesion = np.asarray(lesion, dtype=bool)
            lung = lung | lesion
        return cls(body=body, lung=lung, lesion=lesion)


def box_shares(boxes: np.ndarray, anatomy: ScanAnatomy) -> np.ndarray:
    """(K, 4) share of each box's voxels that are lesion (NaN if unknown), lung, other tissue
    and air outside the body (the last three sum to 1).

    Args:
        boxes: (K, 6) integer boxes ``(h0, w0, d0, h1, w1, d1)``, half-open, on the masks' grid.
    """
    boxes = np.asarray(boxes, dtype=int).reshape(-1, 6)
    out = np.zeros((len(boxes), 4))
    for j, (h0, w0, d0, h1, w1, d1) in enumerate(boxes):
        region = np.s_[h0:h1, w0:w1, d0:d1]
        lung, air = anatomy.lung[region].mean(), 1.0 - anatomy.body[region].mean()
        lesion = np.nan if anatomy.lesion is None else anatomy.lesion[region].mean()
        out[j] = (lesion, lung, 1.0 - lung - air, air)
    return out


def place_of(shares: np.ndarray) -> list[str]:
    """The place (``PLACES``) holding most of each box's voxels, from :func:`box_shares` rows."""
    return [PLACES[int(np.argmax(row[1:]))] for row in np.atleast_2d(shares)]


def describe_boxes(shares: np.ndarray, has_lesion: bool = True) -> str:
    """One line for a figure title, e.g. ``'ROI boxes 0-2: 1 touches the lesion; mostly in lung (2), air outside
    the body (1)'``; the lesion part only when the scan has a known, non-empty lesion mask (``has_lesion``)."""
    shares = np.atleast_2d(shares)
    places = place_of(shares)
    counts = ", ".join(f"{p} ({places.count(p)})" for p in PLACES if places.count(p))
    lesion = ""
    if has_lesion and not np.isnan(shares[:, 0]).any():
        touching = int((shares[:, 0] > 0).sum())
        lesion = f"{touching} {'touches' if touching == 1 else 'touch'} the lesion; "
    return f"ROI boxes 0-{len(shares) - 1}: {lesion}mostly in {counts}"


@dataclass(frozen=True)
class Placement:
    """Where the ROI boxes of a set of scans lie (:func:`summarise`)."""

    n_scans: int
    n_boxes: int
    places: dict[str, int]  # boxes by the place holding most of their voxels
    voxel_shares: dict[str, float]  # share of all box voxels in each place
    lesion_scans: int  # scans with a known, non-empty lesion mask
    lesion_boxes: int  # their boxes
    on_lesion: int  # of those, boxes with at least one lesion voxel
    box_lesion_share: float  # share of those boxes' voxels that are lesion
    lung_lesion_share: float  # share of those scans' lung voxels that are lesion
    body_lesion_share: float  # share of those scans' body voxels that are lesion (boxes placed at random in the body)
    distinct_boxes: int  # distinct box positions over all scans

    def lines(self, split: str) -> list[str]:
        """A few plain lines for a notebook (``split`` names the scans, e.g. 'validation')."""
        places = ", ".join(f"{p} {n}" for p, n in self.places.items())
        voxels = ", ".join(f"{100 * v:.0f}% {p}" for p, v in self.voxel_shares.items())
        out = [f"{split} split, {self.n_scans} scans x {self.n_boxes // max(self.n_scans, 1)} ROI boxes = "
               f"{self.n_boxes} boxes; mostly in: {places}",
               f"of all box voxels: {voxels}",
               f"distinct box positions: {self.distinct_boxes} of {self.n_boxes}"]
        if self.lesion_scans:
            scans = f"{self.lesion_scans} scan{'s' if self.lesion_scans != 1 else ''}"
            out.append(f"on the {scans} with a known lesion: {self.on_lesion} of {self.lesion_boxes} "
                       f"boxes touch it; {100 * self.box_lesion_share:.1f}% of their box voxels are lesion, against "
                       f"{100 * self.body_lesion_share:.1f}% of the body (boxes placed at random in it) and "
                       f"{100 * self.lung_lesion_share:.1f}% of the lungs")
        else:
            out.append("no lesion masks (not embedded phantoms): lesion overlap not measured")
        return out


def summarise(boxes: Sequence[np.ndarray], anatomies: Sequence[ScanAnatomy]) -> Placement:
    """Pool the (K, 6) input-grid boxes of several scans with their :class:`ScanAnatomy`."""
    if len(boxes) != len(anatomies) or not len(boxes):
        raise ValueError(f"pass one anatomy per scan's boxes and at least one scan, got {len(boxes)} and "
                         f"{len(anatomies)}")
    places = {p: 0 for p in PLACES}
    place_voxels = np.zeros(len(PLACES))
    n_boxes = lesion_scans = lesion_boxes = on_lesion = 0
    box_lesion = box_voxels = lung_lesion = lung_voxels = body_voxels = 0.0
    for scan_boxes, anatomy in zip(boxes, anatomies):
        shares = box_shares(scan_boxes, anatomy)
        sizes = np.prod(np.asarray(scan_boxes)[:, 3:] - np.asarray(scan_boxes)[:, :3], axis=1)  # (K,) voxels
        n_boxes += len(shares)
        place_voxels += (shares[:, 1:] * sizes[:, None]).sum(axis=0)
        for place in place_of(shares):
            places[place] += 1
        if anatomy.lesion is not None and anatomy.lesion.any():
            lesion_scans += 1
            lesion_boxes += len(shares)
            on_lesion += int((shares[:, 0] > 0).sum())
            box_lesion += float((shares[:, 0] * sizes).sum())
            box_voxels += float(sizes.sum())
            lung_lesion += float(anatomy.lesion.sum())
            lung_voxels += float(anatomy.lung.sum())
            body_voxels += float(anatomy.body.sum())
    distinct = len({tuple(int(v) for v in box) for scan_boxes in boxes for box in np.asarray(scan_boxes)})
    voxel_shares = dict(zip(PLACES, (place_voxels / place_voxels.sum()).tolist()))
    return Placement(n_scans=len(boxes), n_boxes=n_boxes, places=places, voxel_shares=voxel_shares,
                     lesion_scans=lesion_scans,
                     lesion_boxes=lesion_boxes, on_lesion=on_lesion,
                     box_lesion_share=box_lesion / box_voxels if box_voxels else float("nan"),
                     lung_lesion_share=lung_lesion / lung_voxels if lung_voxels else float("nan"),
                     body_lesion_share=lung_lesion / body_voxels if body_voxels else float("nan"),
                     distinct_boxes=distinct)
