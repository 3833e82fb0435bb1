"""Hyperparameters of the DCG (``models/dcg_model.py``): :class:`DCGConfig`.

Every field is a documented constructor argument; ``__post_init__`` validates them together
and the properties derive the sizes the model needs (saliency grid, ROI crop sizes).
Layouts follow the seed: a volume is (H, W, D), a batch (B, Ch, H, W, D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from models.plain_config import PlainConfig

_TUPLE_FIELDS = ("input_shape", "global_channels", "global_blocks", "roi_size",
                 "local_channels", "local_blocks")


@dataclass
class DCGConfig(PlainConfig):
    """Hyperparameters of the DCG; every field is a constructor argument.

    Args:
        num_classes: C, number of classes (2: normal / COVID-19; 5: MosMedData CT-0..CT-4).
        in_channels: Ch, channels of the input volume (1 for CT).
        input_shape: (H, W, D) of the input volume; each must be divisible by the total
            encoder stride (16), so that saliency cells tile the volume exactly.
        global_channels: channels of the four global encoder stages; the stem (3x3x3,
            stride 2) has ``global_channels[0]`` channels and stages 1-3 end with a 2x2x2
            max pool, so the output is (B, global_channels[-1], H/16, W/16, D/16).
        global_blocks: conv-BatchNorm-ReLU layers per global stage (len == len(global_channels)).
        feature_dim: channels of the global feature map; must equal ``global_channels[-1]``
            (stated separately because downstream modules, e.g. the prior generator, size
            themselves from it).
        pooling: how class maps become global logits: ``'topt'`` (top-t% pooling, GMIC) or
            ``'mean'`` (global average pooling; kept only for the benchmark ablation).
        top_t: fraction t of saliency cells averaged by top-t% pooling (at least one cell).
        num_rois: K, number of regions of interest cropped per volume; must not exceed the
            number of saliency cells.
        roi_size: (h, w, d) voxel size of each crop at ``roi_scale == 1``.
        roi_scale: 1 crops from the input volume itself; s > 1 crops (s*h, s*w, d) from a copy
            of the volume at s times the in-plane resolution, ``x_hires`` (B, Ch, sH, sW, D),
            passed to ``forward`` (GMIC: low-resolution saliency, high-resolution crops).
        nms_radius: non-maximum suppression radius in saliency cells (Chebyshev distance): a
            cell within ``nms_radius`` of an already chosen cell is skipped, so 1 suppresses
            the 3x3x3 neighbourhood and 0 only forbids choosing the same cell twice.
        local_channels: channels of the local encoder stages (stem has local_channels[0]
            channels, stride 1; stages strides (1, 2, 2, ...)).
        local_blocks: bottleneck residual blocks per local stage.
        local_dim: L, dimension of each ROI vector; must equal ``local_channels[-1]``.
        attention_dim: hidden size of the gated-attention MIL (Ilse et al. 2018: V, U in R^{A x L}).
        bottleneck_divisor: a local bottleneck block with c output channels uses c // divisor
            channels in its 3x3x3 convolution.
        norm_groups: GroupNorm groups of the local encoder (the largest divisor of the
            channel count not above this is used).
        grad_checkpoint: recompute the global encoder stages in the backward pass
            (torch.utils.checkpoint) while training, trading compute for memory (e.g. on a T4).
        roi_foreground: choose ROIs only among foreground cells (:func:`foreground_cells`),
            so a saliency that lights up air outside the body cannot send crops there; when
            fewer than K foreground cells exist, background cells fill up the K.
        foreground_threshold: a voxel is foreground when its intensity (mean over input
            channels) exceeds this; 0.05 on CT scaled from the HU window [-1000, 400] to
            [0, 1] is -930 HU (air is ~0, lung parenchyma ~0.07-0.15), and MedMNIST shape
            masks have background exactly 0.
        foreground_fraction: a saliency cell is foreground when at least this fraction of
            the voxels of its input region (cell_stride^3) is foreground.
        roi_weighting: how the normalised class maps are combined into ROI scores:
            ``'sum'`` (GMIC: equal weights) or ``'probs'`` (weighted by the detached global
            class probabilities). With softmax classes one map is the "normal" class, whose
            maxima mark normal tissue; summing it in made the 2-ROI tiny DCG miss the lesion
            the class-1 map had found in up to 2 of 3 positive volumes of the blob test,
            weighting by the prediction follows the map of the class the DCG predicts.
    """

    num_classes: int = 2
    in_channels: int = 1
    input_shape: tuple[int, int, int] = (128, 128, 64)
    global_channels: tuple[int, ...] = (32, 64, 128, 256)
    global_blocks: tuple[int, ...] = (1, 2, 2, 1)
    feature_dim: int = 256
    pooling: str = "topt"
    top_t: float = 0.05
    num_rois: int = 5
    roi_size: tuple[int, int, int] = (16, 16, 8)
    roi_scale: int = 1
    nms_radius: int = 1
    local_channels: tuple[int, ...] = (32, 64, 128)
    local_blocks: tuple[int, ...] = (1, 2, 3)
    local_dim: int = 128
    attention_dim: int = 128
    bottleneck_divisor: int = 2
    norm_groups: int = 8
    grad_checkpoint: bool = False
    roi_foreground: bool = True
    foreground_threshold: float = 0.05
    foreground_fraction: float = 0.1
    roi_weighting: str = "probs"

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.num_classes < 2:
            raise ValueError(f"DCGConfig.num_classes must be >= 2, got {self.num_classes}")
        if len(self.input_shape) != 3 or len(self.roi_size) != 3:
            raise ValueError("DCGConfig.input_shape and roi_size must be (H, W, D) triples")
        if len(self.global_blocks) != len(self.global_channels) or len(self.global_channels) != 4:
            raise ValueError("DCGConfig.global_channels and global_blocks must both have 4 "
                             f"entries (stride 16), got {self.global_channels} and "
                             f"{self.global_blocks}")
        if len(self.local_blocks) != len(self.local_channels) or not self.local_channels:
            raise ValueError("DCGConfig.local_channels and local_blocks must have the same, "
                             "non-zero length")
        if self.feature_dim != self.global_channels[-1]:
            raise ValueError(f"DCGConfig.feature_dim={self.feature_dim} must equal "
                             f"global_channels[-1]={self.global_channels[-1]}")
        if self.local_dim != self.local_channels[-1]:
            raise ValueError(f"DCGConfig.local_dim={self.local_dim} must equal "
                             f"local_channels[-1]={self.local_channels[-1]}")
        if any(n % self.cell_stride for n in self.input_shape):
            raise ValueError(f"DCGConfig.input_shape={self.input_shape} must be divisible by "
                             f"the encoder stride {self.cell_stride}")
        if self.pooling not in ("topt", "mean"):
            raise ValueError(f"DCGConfig.pooling must be 'topt' or 'mean', got {self.pooling!r}")
        if not 0.0 < self.top_t <= 1.0:
            raise ValueError(f"DCGConfig.top_t must be in (0, 1], got {self.top_t}")
        if self.roi_weighting not in ("sum", "probs"):
            raise ValueError(f"DCGConfig.roi_weighting must be 'sum' or 'probs', got {self.roi_weighting!r}")
        if self.roi_scale < 1 or self.nms_radius < 0:
            raise ValueError("DCGConfig.roi_scale must be >= 1 and nms_radius >= 0, got "
                             f"{self.roi_scale}, {self.nms_radius}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError("DCGConfig.foreground_fraction must be in [0, 1], got "
                             f"{self.foreground_fraction}")
        n_cells = math.prod(self.saliency_shape)
        if not 1 <= self.num_rois <= n_cells:
            raise ValueError(f"DCGConfig.num_rois={self.num_rois} must be in [1, {n_cells}] "
                             f"(saliency cells {self.saliency_shape} for input {self.input_shape})")
        if any(r > n for r, n in zip(self.crop_size, self.crop_source_shape)):
            raise ValueError(f"DCGConfig crop size {self.crop_size} does not fit in the "
                             f"volume it is cropped from {self.crop_source_shape}")

    # derived sizes ---------------------------------------------------------------------------
    @property
    def cell_stride(self) -> int:
        """Voxels per saliency cell along each axis of the input volume (stem 2 x 3 pools 2)."""
        return 16

    @property
    def saliency_shape(self) -> tuple[int, int, int]:
        """(h, w, d) of the saliency / global feature map."""
        return tuple(n // self.cell_stride for n in self.input_shape)

    @property
    def crop_source_shape(self) -> tuple[int, int, int]:
        """(H', W', D) of the volume ROIs are cropped from: (sH, sW, D) for roi_scale s."""
        h, w, d = self.input_shape
        return (h * self.roi_scale, w * self.roi_scale, d)

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """(h, w, d) voxel size of each crop in the volume it is cropped from."""
        h, w, d = self.roi_size
        return (h * self.roi_scale, w * self.roi_scale, d)
