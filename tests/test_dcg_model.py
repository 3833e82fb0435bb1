"""Behaviour of the 3D DCG: shapes, top-t pooling, ROI selection and cropping, MIL, gradients."""
import json
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from models.dcg_config import DCGConfig
from models.dcg_model import DCG, DCGOutput, dcg_objective, local_ce_weight, warmup_top_t
from models.encoders import GatedAttentionMIL
from models.roi import (cells_to_boxes, crop_rois, foreground_cells, pool_maps, roi_scores, select_cells,
                        top_t_pool)
from models.diffmic3d import ModelConfig


MID = dict(input_shape=(64, 64, 32), num_rois=5)  # saliency (4, 4, 2): 32 cells


def small_config(**kw) -> DCGConfig:
    """The seed architecture on a (32, 32, 16) volume: saliency (2, 2, 1), 4 cells, 3 ROIs."""
    base = dict(input_shape=(32, 32, 16), num_rois=3)
    base.update(kw)
    return DCGConfig(**base)


def make_model(cfg: DCGConfig, seed: int = 0) -> DCG:
    torch.manual_seed(seed)
    return DCG(cfg).eval()


def make_inputs(cfg: DCGConfig, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cfg.in_channels, *cfg.input_shape, generator=g)
    x_hires = None
    if cfg.roi_scale > 1:
        x_hires = torch.rand(batch, cfg.in_channels, *cfg.crop_source_shape, generator=g)
    return x, x_hires


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

SHAPE_CASES = [
    # (config kwargs, batch)
    (dict(num_classes=2, **MID), 1),
    (dict(num_classes=5, **MID), 3),
    (dict(num_classes=2, roi_scale=2, **MID), 3),
    (dict(num_classes=5, roi_scale=2, **MID), 1),
    (dict(num_classes=2), 3),
    (dict(num_classes=5, num_rois=4, roi_scale=2), 1),
    (dict(num_classes=2, in_channels=2, pooling="mean"), 1),
]


@pytest.mark.parametrize("kw,batch", SHAPE_CASES)
def test_output_shapes_and_dtypes(kw, batch):
    cfg = small_config(**kw)
    x, x_hires = make_inputs(cfg, batch)
    with torch.no_grad():
        out = make_model(cfg)(x, x_hires)
    b, c, k, (h, w, d) = batch, cfg.num_classes, cfg.num_rois, cfg.saliency_shape
    expected = {
        "global_logits": (b, c), "local_logits": (b, c), "global_probs": (b, c),
        "local_probs": (b, c), "fused_probs": (b, c), "saliency": (b, c, h, w, d),
        "roi_boxes": (b, k, 6), "roi_cells": (b, k, 3), "global_features": (b, cfg.feature_dim),
        "roi_features": (b, k, cfg.local_dim), "attention": (b, k),
    }
    got = out.as_dict()
    assert set(got) == set(expected)
    for name, shape in expected.items():
        assert tuple(got[name].shape) == shape, name
        want_dtype = torch.int64 if name in ("roi_boxes", "roi_cells") else torch.float32
        assert got[name].dtype == want_dtype, name
    for name in ("global_probs", "local_probs", "fused_probs"):
        torch.testing.assert_close(got[name].sum(-1), torch.ones(b))
    torch.testing.assert_close(out.fused_probs, (out.global_probs + out.local_probs) / 2)
    # boxes: inside the volume cropped from, of the crop size, one distinct cell per ROI
    size = torch.tensor(cfg.crop_size)
    assert (out.roi_boxes[..., 3:] - out.roi_boxes[..., :3] == size).all()
    assert (out.roi_boxes[..., :3] >= 0).all()
    assert (out.roi_boxes[..., 3:] <= torch.tensor(cfg.crop_source_shape)).all()
    for cells in out.roi_cells:
        assert len({tuple(cell.tolist()) for cell in cells}) == k


def test_full_size_global_features():
    """Seed config: (1, 1, 128, 128, 64) -> features (1, 256, 8, 8, 4), saliency (1, 2, 8, 8, 4)."""
    cfg = DCGConfig()
    model = make_model(cfg)
    x = torch.rand(1, 1, 128, 128, 64)
    with torch.no_grad():
        feats = model.global_encoder(x)
        out = model(x)
    assert tuple(feats.shape) == (1, 256, 8, 8, 4)
    assert tuple(out.saliency.shape) == (1, 2, 8, 8, 4)
    assert cfg.saliency_shape == (8, 8, 4)


def test_param_counts_near_targets():
    counts = DCG(DCGConfig()).param_counts()
    assert 1.4e6 <= counts["global_encoder"] <= 2.6e6
    assert 3.5e5 <= counts["local_encoder"] <= 6.5e5
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["total"] == sum(p.numel() for p in DCG(DCGConfig()).parameters())


def _is_bn(m):
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm)


def test_batchnorm_only_in_the_global_encoder():
    # the global encoder is conv-BN-ReLU-maxpool (training recomputes its statistics); the
    # local encoder, which sees a batch of B * K crops, keeps GroupNorm
    model = DCG(small_config())
    assert any(_is_bn(m) for m in model.global_encoder.modules())
    assert sum(isinstance(m, torch.nn.MaxPool3d) for m in model.global_encoder.modules()) == 3
    assert not any(_is_bn(m) for m in model.local_encoder.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.local_encoder.modules())


# ---------------------------------------------------------------------------------------------
# configuration and input validation
# ---------------------------------------------------------------------------------------------

def test_config_round_trip_through_json():
    cfg = DCGConfig(num_classes=5, roi_scale=2, top_t=0.1, roi_size=(8, 8, 4))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert isinstance(data["input_shape"], list)
    back = DCGConfig.from_dict(data)
    assert back == cfg
    assert isinstance(back.input_shape, tuple)


@pytest.mark.parametrize("kw,match", [
    (dict(num_rois=5), "num_rois"),  # only 4 cells
    (dict(input_shape=(60, 64, 32)), "divisible"),
    (dict(feature_dim=128), "feature_dim"),
    (dict(local_dim=64), "local_dim"),
    (dict(pooling="max"), "pooling"),
    (dict(top_t=0.0), "top_t"),
    (dict(roi_size=(16, 16, 64)), "crop size"),
    (dict(global_blocks=(1, 1, 1)), "global_blocks"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        DCGConfig.from_dict({**DCGConfig().to_dict(), "cam_size": 7})


@pytest.mark.parametrize("kw,x_shape,hires_shape,match", [
    (dict(), (1, 1, 32, 32, 32), None, "input must be"),
    (dict(), (1, 32, 32, 16), None, "input must be"),
    (dict(), (1, 1, 32, 32, 16), (1, 1, 64, 64, 16), "roi_scale == 1"),
    (dict(roi_scale=2), (1, 1, 32, 32, 16), None, "needs x_hires"),
    (dict(roi_scale=2), (1, 1, 32, 32, 16), (1, 1, 32, 32, 16), "needs x_hires"),
    (dict(roi_scale=2), (1, 1, 32, 32, 16), (2, 1, 64, 64, 16), "needs x_hires"),
])
def test_forward_rejects_bad_inputs(kw, x_shape, hires_shape, match):
    model = DCG(small_config(**kw))
    x_hires = None if hires_shape is None else torch.zeros(hires_shape)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(x_shape), x_hires)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------

def test_top_t_pool_is_mean_of_top_cells():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 4, 5, 2, generator=g)  # N = 40 cells
    pooled = top_t_pool(maps, 0.1)  # ceil(4.0) = 4 cells
    flat = maps.flatten(2)
    for b in range(2):
        for c in range(3):
            top = sorted(flat[b, c].tolist(), reverse=True)[:4]
            assert pooled[b, c].item() == pytest.approx(sum(top) / 4, abs=1e-6)
    assert not torch.allclose(pooled, pool_maps(maps, "mean", 0.1))
    torch.testing.assert_close(pool_maps(maps, "mean", 0.1), flat.mean(-1))


@pytest.mark.parametrize("top_t,n_cells,k", [(0.05, 256, 13), (0.05, 4, 1), (1e-6, 32, 1),
                                             (1.0, 32, 32), (0.25, 32, 8)])
def test_top_t_pool_cell_count(top_t, n_cells, k):
    """A map with values 1..N: the top-t pool is the mean of the k = max(1, ceil(tN)) largest."""
    maps = torch.arange(1.0, n_cells + 1).view(1, 1, n_cells, 1, 1)
    expected = sum(range(n_cells - k + 1, n_cells + 1)) / k
    assert top_t_pool(maps, top_t).item() == pytest.approx(expected)


def test_small_bright_blob_drives_top_t_more_than_mean():
    """One bright cell in an 8x8x4 map: top-5% pooling (13 cells) sees 1/13 of it, mean 1/256."""
    background = torch.zeros(1, 1, 8, 8, 4)
    blob = background.clone()
    blob[0, 0, 2, 5, 1] = 10.0
    gain_topt = (top_t_pool(blob, 0.05) - top_t_pool(background, 0.05)).item()
    gain_mean = (pool_maps(blob, "mean", 0.05) - pool_maps(background, "mean", 0.05)).item()
    assert gain_topt == pytest.approx(10 / 13)
    assert gain_mean == pytest.approx(10 / 256)
    assert gain_topt > 10 * gain_mean


@pytest.mark.parametrize("pooling", ["topt", "mean"])
def test_model_global_logits_pool_the_saliency(pooling):
    cfg = small_config(pooling=pooling, top_t=0.1, **MID)  # 32 cells: top 4
    x, _ = make_inputs(cfg, 2)
    with torch.no_grad():
        out = make_model(cfg)(x)
    flat = out.saliency.flatten(2)
    if pooling == "topt":
        expected = flat.topk(math.ceil(0.1 * flat.shape[-1]), dim=-1).values.mean(-1)
    else:
        expected = flat.mean(-1)
    torch.testing.assert_close(out.global_logits, expected)
    torch.testing.assert_close(out.global_probs, out.global_logits.softmax(-1))


# ---------------------------------------------------------------------------------------------
# ROI selection
# ---------------------------------------------------------------------------------------------

def test_roi_scores_normalise_each_class():
    """A class map with a 1000x larger scale does not swamp the other class."""
    sal = torch.zeros(1, 2, 4, 4, 2)
    sal[0, 0, 0, 0, 0] = 1000.0  # class 0 peak
    sal[0, 1, 3, 3, 1] = 1.0  # class 1 peak, tiny scale
    scores = roi_scores(sal)
    assert scores.shape == (1, 4, 4, 2)
    assert scores[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert scores[0, 3, 3, 1].item() == pytest.approx(1.0)
    assert scores.min().item() == pytest.approx(0.0)
    assert roi_scores(torch.full((1, 3, 2, 2, 2), 5.0)).abs().max().item() == 0.0


def test_select_cells_picks_known_maxima_in_order():
    scores = torch.zeros(2, 6, 6, 4)
    peaks = [[(0, 0, 0), (5, 5, 3), (2, 3, 1)], [(4, 1, 2), (1, 4, 0), (5, 0, 0)]]
    for b, cells in enumerate(peaks):
        for rank, cell in enumerate(cells):
            scores[(b, *cell)] = 3.0 - rank
    chosen = select_cells(scores, 3, nms_radius=1)
    assert chosen.dtype == torch.int64
    assert chosen.tolist() == [[list(c) for c in cells] for cells in peaks]


def test_nms_prevents_adjacent_cells_on_a_plateau():
    """A 3x3x3 plateau of near-equal cells plus weaker far cells: without NMS the K picks are
    neighbours on the plateau; with radius 1 they are pairwise non-adjacent."""
    g = torch.Generator().manual_seed(0)
    scores = 0.1 * torch.rand(1, 8, 8, 8, generator=g)
    scores[0, 2:5, 2:5, 2:5] = 1.0 + 0.01 * torch.rand(3, 3, 3, generator=g)
    k = 4
    plain = select_cells(scores, k, nms_radius=0)[0]
    nms = select_cells(scores, k, nms_radius=1)[0]
    cheb = lambda c: (c[:, None] - c[None]).abs().amax(-1)  # noqa: E731  (K, K)
    off_diag = ~torch.eye(k, dtype=torch.bool)
    assert (cheb(plain)[off_diag] <= 2).all()  # all on the plateau, some adjacent
    assert (cheb(plain)[off_diag] == 1).any()
    assert (cheb(nms)[off_diag] > 1).all()
    # the first pick is the plateau maximum either way
    flat_best = scores[0].flatten().argmax().item()
    assert nms[0].tolist() == list(divmod(flat_best // 8, 8)) + [flat_best % 8]


@pytest.mark.parametrize("shape,k,radius", [((2, 2, 1), 4, 1), ((2, 2, 1), 3, 5),
                                            ((4, 4, 2), 32, 1), ((3, 3, 3), 2, 1)])
def test_select_cells_fills_up_when_nms_leaves_too_few(shape, k, radius):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, *shape, generator=g)
    chosen = select_cells(scores, k, nms_radius=radius)
    assert chosen.shape == (2, k, 3)
    for b in range(2):
        assert len({tuple(c) for c in chosen[b].tolist()}) == k  # distinct
        assert (chosen[b] >= 0).all() and (chosen[b] < torch.tensor(shape)).all()
        # the first pick is always the global maximum
        assert scores[(b, *chosen[b, 0].tolist())] == scores[b].max()


def test_select_cells_rejects_too_many_rois():
    with pytest.raises(ValueError, match="num_rois"):
        select_cells(torch.rand(1, 2, 2, 1), 5, 1)


# ---------------------------------------------------------------------------------------------
# boxes and cropping
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell,stride,crop,volume,box", [
    # seed geometry: 16 voxel cells, (16, 16, 8) crops centred in the cell
    ((0, 0, 0), (16, 16, 16), (16, 16, 8), (64, 64, 32), (0, 0, 4, 16, 16, 12)),
    ((3, 3, 1), (16, 16, 16), (16, 16, 8), (64, 64, 32), (48, 48, 20, 64, 64, 28)),
    ((1, 2, 0), (16, 16, 16), (16, 16, 8), (64, 64, 32), (16, 32, 4, 32, 48, 12)),
    # roi_scale 2: (32, 32, 8) crops from the (2H, 2W, D) copy
    ((3, 0, 1), (32, 32, 16), (32, 32, 8), (128, 128, 32), (96, 0, 20, 128, 32, 28)),
    # crops larger than a cell are clamped inside at both borders
    ((0, 0, 0), (16, 16, 16), (24, 24, 24), (64, 64, 32), (0, 0, 0, 24, 24, 24)),
    ((3, 3, 1), (16, 16, 16), (24, 24, 24), (64, 64, 32), (40, 40, 8, 64, 64, 32)),
    ((1, 1, 1), (16, 16, 16), (24, 24, 24), (64, 64, 48), (12, 12, 12, 36, 36, 36)),
])
def test_cells_to_boxes(cell, stride, crop, volume, box):
    boxes = cells_to_boxes(torch.tensor([[cell]]), stride, crop, volume)
    assert boxes.dtype == torch.int64
    assert boxes[0, 0].tolist() == list(box)


def test_cells_to_boxes_every_cell_inside_and_centred_when_unclamped():
    grid = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), torch.arange(4),
                                      indexing="ij"), -1).view(1, -1, 3)  # (1, 256, 3)
    boxes = cells_to_boxes(grid, (16, 16, 16), (16, 16, 8), (128, 128, 64))[0]
    assert (boxes[:, :3] >= 0).all()
    assert (boxes[:, 3:] <= torch.tensor([128, 128, 64])).all()
    centres2 = boxes[:, :3] + boxes[:, 3:]  # twice the box centre
    torch.testing.assert_close(centres2, (2 * grid[0] + 1) * 16)


def test_crop_rois_equals_slicing():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 3, 20, 18, 10, generator=g)
    size = (5, 4, 3)
    k = 4
    starts = torch.stack([torch.randint(0, n - s + 1, (2, k), generator=g)
                          for n, s in zip((20, 18, 10), size)], -1)  # (B, K, 3)
    starts[0, 0] = torch.tensor([15, 14, 7])  # box touching the far corner
    starts[1, 0] = 0  # box at the origin
    boxes = torch.cat([starts, starts + torch.tensor(size)], -1)
    crops = crop_rois(volume, boxes)
    assert crops.shape == (2, k, 3, *size)
    for b in range(2):
        for j in range(k):
            h0, w0, d0, h1, w1, d1 = boxes[b, j].tolist()
            assert torch.equal(crops[b, j], volume[b, :, h0:h1, w0:w1, d0:d1])


@pytest.mark.parametrize("boxes,match", [
    ([[[0, 0, 0, 4, 4, 4], [0, 0, 0, 4, 4, 3]]], "equal size"),
    ([[[-1, 0, 0, 3, 4, 4]]], "inside"),
    ([[[6, 0, 0, 10, 4, 4]]], "inside"),
    ([[[0, 0, 0, 0, 4, 4]]], "non-empty"),
])
def test_crop_rois_rejects_bad_boxes(boxes, match):
    with pytest.raises(ValueError, match=match):
        crop_rois(torch.zeros(1, 1, 8, 8, 8), torch.tensor(boxes))


def test_roi_scale_2_crops_from_the_high_resolution_copy():
    """The local stream sees x_hires only: changing it moves the local logits, not the global."""
    cfg = small_config(roi_scale=2)
    model = make_model(cfg)
    x, x_hires = make_inputs(cfg, 2)
    with torch.no_grad():
        a = model(x, x_hires)
        b = model(x, x_hires + 0.5 * torch.rand_like(x_hires))
    torch.testing.assert_close(a.global_logits, b.global_logits)
    assert torch.equal(a.roi_boxes, b.roi_boxes)
    assert not torch.allclose(a.local_logits, b.local_logits)


def test_model_crops_the_selected_cells():
    cfg = small_config(**MID)
    x, _ = make_inputs(cfg, 2)
    with torch.no_grad():
        out = make_model(cfg)(x)
    expected_cells = select_cells(roi_scores(out.saliency, weights=out.global_probs), cfg.num_rois,
                                  cfg.nms_radius)
    assert torch.equal(out.roi_cells, expected_cells)
    expected_boxes = cells_to_boxes(expected_cells, (16, 16, 16), cfg.crop_size, cfg.input_shape)
    assert torch.equal(out.roi_boxes, expected_boxes)


# ---------------------------------------------------------------------------------------------
# attention MIL
# ---------------------------------------------------------------------------------------------

def test_gated_attention_weights_and_pooling():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(16, 8)
    h = torch.randn(3, 5, 16) * 4
    z, a = mil(h)
    assert a.shape == (3, 5) and z.shape == (3, 16)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3))
    torch.testing.assert_close(z, (a[..., None] * h).sum(1))
    gated = mil.w(torch.tanh(mil.V(h)) * torch.sigmoid(mil.U(h))).squeeze(-1)
    torch.testing.assert_close(a, gated.softmax(-1))


# ---------------------------------------------------------------------------------------------
# gradients, checkpointing, determinism
# ---------------------------------------------------------------------------------------------

def _grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return sum(float(g.abs().sum()) for g in grads), len(grads)


@pytest.mark.parametrize("head", ["global_logits", "local_logits"])
def test_gradients_reach_only_their_own_stream(head):
    cfg = small_config()
    model = make_model(cfg).train()
    x, _ = make_inputs(cfg, 2)
    out = model(x)
    F.cross_entropy(getattr(out, head), torch.tensor([0, 1])).backward()
    g_norm, g_count = _grad_norm(model.global_encoder)
    l_norm, l_count = _grad_norm(model.local_encoder)
    if head == "global_logits":
        assert g_norm > 0 and g_count == len(list(model.global_encoder.parameters()))
        assert l_count == 0  # the local stream does not feed the global logits
    else:
        assert l_norm > 0 and l_count == len(list(model.local_encoder.parameters()))
        assert g_count == 0  # ROI selection is by index: no gradient into the global stream
        assert _grad_norm(model.attention)[0] > 0


def test_grad_checkpoint_matches_plain_forward_and_backward():
    cfg = small_config()
    plain = make_model(cfg).train()
    ckpt = DCG(small_config(grad_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, _ = make_inputs(cfg, 2)
    outs, stage_calls = [], []
    for model in (plain, ckpt):
        calls = []
        first_conv = model.global_encoder.stages[0][0][0]
        hook = first_conv.register_forward_hook(lambda *_: calls.append(1))
        out = model(x)
        (out.global_logits.sum() + out.local_logits.sum()).backward()
        hook.remove()
        outs.append(out)
        stage_calls.append(len(calls))
    assert stage_calls == [1, 2]  # checkpointing recomputes the stage in the backward pass
    for name, value in outs[0].as_dict().items():
        torch.testing.assert_close(outs[1].as_dict()[name], value)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_same_seed_same_model_and_outputs():
    cfg = small_config(num_classes=5)
    x, _ = make_inputs(cfg, 2)
    with torch.no_grad():
        a = make_model(cfg, seed=7)(x)
        b = make_model(cfg, seed=7)(x)
        c = make_model(cfg, seed=8)(x)
    for name, value in a.as_dict().items():
        assert torch.equal(value, b.as_dict()[name]), name
    assert not torch.allclose(a.global_logits, c.global_logits)


def test_output_detach_and_to_keep_every_field():
    cfg = small_config(num_rois=2)
    model = make_model(cfg).train()
    x, _ = make_inputs(cfg, 1)
    out = model(x)
    assert out.global_logits.requires_grad
    det = out.detach()
    assert isinstance(det, DCGOutput)
    assert not any(v.requires_grad for v in det.as_dict().values())
    moved = det.to("cpu")
    for name, value in out.as_dict().items():
        assert torch.equal(moved.as_dict()[name], value.detach())
    assert DCGOutput(**det.as_dict()).as_dict().keys() == out.as_dict().keys()


# ---------------------------------------------------------------------------------------------
# foreground-restricted ROI selection
# ---------------------------------------------------------------------------------------------

def test_foreground_cells_pool_the_input_per_cell():
    x = torch.zeros(2, 1, 32, 32, 16)
    x[0, 0, :16, :, :] = 0.5  # cells (0, *, 0) foreground
    x[1, 0, 16:, 16:, :2] = 1.0  # 2/16 of the cell's voxels: fraction 0.125
    fg = foreground_cells(x, 16, threshold=0.05, fraction=0.1)
    assert fg.shape == (2, 2, 2, 1) and fg.dtype == torch.bool
    assert fg[0].flatten().tolist() == [True, True, False, False]
    assert fg[1].flatten().tolist() == [False, False, False, True]
    assert not foreground_cells(x, 16, threshold=0.05, fraction=0.2)[1].any()


def test_select_cells_prefers_valid_cells_and_fills_up_when_too_few():
    scores = torch.tensor([[9.0, 8.0, 1.0, 2.0, 3.0, 0.5]]).view(1, 6, 1, 1)
    valid = torch.tensor([[False, False, True, True, True, False]]).view(1, 6, 1, 1)
    cells = select_cells(scores, 3, nms_radius=1, valid=valid)[0, :, 0].tolist()
    assert cells == [4, 2, 3]  # valid only, by score, suppressed valid cells before invalid ones
    cells = select_cells(scores, 5, nms_radius=0, valid=valid)[0, :, 0].tolist()
    assert cells == [4, 3, 2, 0, 1]  # fewer than K valid: the best invalid ones fill up
    assert select_cells(scores, 2, 0)[0, :, 0].tolist() == [0, 1]  # without a mask, as before


def test_rois_avoid_background_even_where_saliency_is_highest():
    # the saliency is forced to peak in the air (zero) half of the volume: every ROI still lies
    # in the body half; with roi_foreground=False the same maps send the ROIs into the air
    x = torch.zeros(2, 1, 64, 64, 32)
    x[:, :, :32] = 0.4 + 0.05 * torch.rand(2, 1, 32, 64, 32)  # body: cells i in {0, 1}
    forced = torch.zeros(2, 2, 4, 4, 2)
    forced[:, :, 2:] = torch.rand(2, 2, 2, 4, 2) + 5.0  # all of the background is most salient

    def run(**kw):
        model = make_model(small_config(**MID, **kw))
        model.saliency_head.register_forward_hook(lambda mod, args, out: forced)
        with torch.no_grad():
            return model(x)

    out = run()
    assert (out.roi_cells[..., 0] < 2).all(), out.roi_cells
    assert (out.roi_boxes[..., 3] <= 32).all()  # boxes end inside the body half
    assert (run(roi_foreground=False).roi_cells[:, 0, 0] >= 2).all()  # the top ROI is in the air


def test_roi_weighting_follows_the_predicted_class_map():
    sal = torch.zeros(1, 2, 4, 1, 1)
    sal[0, 0, :, 0, 0] = torch.tensor([0.0, 3.0, 2.5, 1.0])  # class-0 ("normal") map
    sal[0, 1, :, 0, 0] = torch.tensor([3.0, 0.0, 1.0, 2.0])  # class-1 map peaks in cell 0
    assert roi_scores(sal).flatten().argmax() == 2  # GMIC sum: neither class's peak
    weighted = roi_scores(sal, weights=torch.tensor([[0.1, 0.9]]))
    assert weighted.flatten().argmax() == 0


# ---------------------------------------------------------------------------------------------
# phase-1 curriculum
# ---------------------------------------------------------------------------------------------

def test_warmup_top_t_goes_from_mean_to_top_t():
    assert warmup_top_t(0.0, 0.05, 0.3) == 1.0
    assert warmup_top_t(0.15, 0.05, 0.3) == pytest.approx(0.05 ** 0.5)
    assert warmup_top_t(0.3, 0.05, 0.3) == 0.05 == warmup_top_t(1.0, 0.05, 0.3)
    assert warmup_top_t(0.0, 0.05, 0.0) == 0.05
    values = [warmup_top_t(p / 20, 0.05, 0.3) for p in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_local_ce_weight_schedule():
    assert local_ce_weight(0.29, 0.3, 0.1) == 0.0
    assert local_ce_weight(0.35, 0.3, 0.1) == pytest.approx(0.5)
    assert local_ce_weight(0.4, 0.3, 0.1) == 1.0 == local_ce_weight(1.0, 0.3, 0.1)
    assert local_ce_weight(0.3, 0.3, 0.0) == 1.0
    with pytest.raises(ValueError):
        local_ce_weight(0.5, 1.5, 0.1)


def test_dcg_objective_curriculum():
    cfg = small_config(**MID, top_t=0.1)
    model = make_model(cfg).train()
    x, _ = make_inputs(cfg, 2)
    y = torch.tensor([0, 1])
    torch.manual_seed(0)
    early = dcg_objective(model, x, y, progress=0.0)
    assert early["top_t"] == 1.0 and early["local_weight"] == 0.0
    # progress 0: global logits are the mean of the class maps; the loss value is still
    # CE_g + CE_l, but no gradient reaches the local stream
    torch.testing.assert_close(early["output"].global_logits, early["output"].saliency.flatten(2).mean(-1))
    torch.testing.assert_close(early["loss"], early["global_ce"] + early["local_ce"])
    early["loss"].backward()
    assert all(p.grad is None for p in model.local_classifier.parameters())
    assert model.saliency_head.weight.grad.abs().sum() > 0
    # progress 1 (the default): exactly the design's objective, top-t pooling
    late = dcg_objective(model.eval(), x, y)
    assert late["top_t"] == cfg.top_t and late["local_weight"] == 1.0
    torch.testing.assert_close(late["output"].global_logits, top_t_pool(late["output"].saliency, cfg.top_t))


# ---------------------------------------------------------------------------------------------
# (d) a short training localises a planted lesion
# ---------------------------------------------------------------------------------------------

LESION_SHAPE = (64, 64, 16)  # saliency (4, 4, 1): 16 cells of 16^3 voxels


def lesion_volumes(n, seed):
    """Half of each volume is a noisy body (0.3), the other half air (0); class 1 has a 6^3
    lesion (+0.6) inside one random body cell, near its centre. Returns x, y, lesion cells."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, *LESION_SHAPE), np.float32)
    y = np.arange(n) % 2
    cells = np.zeros((n, 3), np.int64)
    for i in range(n):
        axis, side = rng.integers(2), rng.integers(2)
        body = [slice(None)] * 3
        body[axis] = slice(32 * side, 32 * side + 32)
        x[i, 0][tuple(body)] = 0.3 + 0.05 * rng.standard_normal((32, 64, 16) if axis == 0 else (64, 32, 16))
        if y[i]:
            cell = rng.integers(0, 4, size=3)
            cell[2], cell[axis] = 0, 2 * side + rng.integers(2)
            h, w, d = cell * 16 + rng.integers(3, 8, size=3)
            x[i, 0, h:h + 6, w:w + 6, d:d + 6] += 0.6
            cells[i] = cell
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(cells)


def localisation(model, x, y, cells):
    """(share of positive volumes whose class-1 saliency peaks in the lesion cell, share with
    a ROI box containing the lesion centre)."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    pos = y == 1
    flat_index = torch.tensor([4, 1, 1])
    peak = (out.saliency[pos, 1].flatten(1).argmax(1) == cells[pos] @ flat_index).float().mean().item()
    centre = (cells[pos] * 16 + 8)[:, None]  # (P, 1, 3)
    boxes = out.roi_boxes[pos]  # (P, K, 6)
    inside = ((centre >= boxes[..., :3]) & (centre < boxes[..., 3:])).all(-1).any(-1)
    return peak, inside.float().mean().item()


def test_short_training_localises_a_planted_lesion(one_thread):
    from utils.training.precise_bn import recompute_batchnorm_stats
    from utils.training.dcg import dcg_lr_factor

    cfg = ModelConfig.tiny(input_shape=LESION_SHAPE).dcg
    x, y, _ = lesion_volumes(48, 0)
    xv, yv, cv = lesion_volumes(32, 1)
    torch.manual_seed(0)
    model = DCG(cfg)
    untrained = localisation(model, xv, yv, cv)
    assert untrained[0] < 0.5  # chance is 1 in 8 body cells
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    steps = 300
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(y), (8,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * dcg_lr_factor(step, steps, 0.05)
        loss = dcg_objective(model, x[index], y[index], label_smoothing=0.1, progress=step / steps)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    recompute_batchnorm_stats(model, [x[i:i + 8] for i in range(0, len(x), 8)], model)
    peak, in_roi = localisation(model, xv, yv, cv)
    # the ROIs must find the lesion; the single saliency peak lands on its cell in half the
    # scans or more (chance: 1 in 8 body cells; untrained: 0). The peak share varies with the
    # floating-point order of the machine (0.5 to 0.8 seen), the ROI share did not.
    assert in_roi >= 0.7 and peak >= 0.4, (peak, in_roi, untrained)
