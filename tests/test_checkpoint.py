"""Tests of utils.training.checkpoint: weights_only round trip, atomic writes, validation, RNG state."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.training.checkpoint import (
    check_config_matches,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from utils.errors import DataError


@dataclasses.dataclass
class TinyConfig:
    in_channels: int = 1
    widths: tuple = (4, 8)
    dropout: float = 0.1


def tiny_model(config: TinyConfig) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv3d(config.in_channels, config.widths[0], 3),
        torch.nn.GroupNorm(2, config.widths[0]),
        torch.nn.Dropout(config.dropout),
        torch.nn.Conv3d(config.widths[0], config.widths[1], 1),
    )


def training_state():
    """A model, optimizer and the two schedulers of the two training phases after one step."""
    torch.manual_seed(0)
    config = TinyConfig()
    model = tiny_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model(torch.randn(2, 1, 5, 5, 5)).square().mean().backward()  # (B, C, H, W, D)
    opt.step()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=3)
    plateau.step(0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5)
    cosine.step()
    return config, model, opt, plateau, cosine


def test_round_trip_with_weights_only(tmp_path):
    config, model, opt, plateau, cosine = training_state()
    gen = np.random.default_rng(5)
    path = save_checkpoint(
        tmp_path / "run" / "model.pth",
        model_config=dataclasses.asdict(config),
        model_state_dict=model.state_dict(),
        optimizer=opt.state_dict(),
        plateau=plateau.state_dict(),
        cosine=cosine.state_dict(),
        epoch=3,
        best={"val_auc": 0.75, "epoch": 2},
        history={"train_loss": [1.0, 0.8, float("nan")]},
        rng=rng_state(numpy_generators={"data": gen}),
    )
    # the file itself loads with plain torch.load(weights_only=True), not only via our loader
    raw = torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)
    assert raw.keys() == ckpt.keys()
    assert ckpt["model_config"] == {"in_channels": 1, "widths": (4, 8), "dropout": 0.1}
    assert ckpt["epoch"] == 3 and ckpt["best"] == {"val_auc": 0.75, "epoch": 2}
    assert ckpt["model_state_dict"]._metadata == model.state_dict()._metadata  # module versions kept
    restored = tiny_model(config)
    restored.load_state_dict(ckpt["model_state_dict"])
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-3, weight_decay=0.01)
    opt2.load_state_dict(ckpt["optimizer"])
    torch.optim.lr_scheduler.ReduceLROnPlateau(opt2).load_state_dict(ckpt["plateau"])
    assert ckpt["cosine"]["T_0"] == 5
    assert ckpt["rng"]["numpy"]["data"] == gen.bit_generator.state  # 128-bit ints survive


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"stats": {"mean": np.zeros(3)}}, "stats.mean"),
        ({"best": {"auc": np.float64(0.7)}}, "best.auc"),  # subclasses float, still refused
        ({"config": TinyConfig()}, "config"),
        ({"paths": ["a", Path("b")]}, r"paths\[1\]"),
        ({"fn": {"act": torch.nn.ReLU()}}, "fn.act"),
        ({"bad": {(1, 2): 3}}, "bad"),
    ],
)
def test_non_plain_data_is_rejected_with_the_key_named(tmp_path, extra, key):
    with pytest.raises(TypeError, match=rf"checkpoint key {key}:"):
        save_checkpoint(tmp_path / "m.pth", model_config={"a": 1}, model_state_dict={}, **extra)
    assert list(tmp_path.iterdir()) == []


def test_model_config_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match="dataclasses.asdict"):
        save_checkpoint(tmp_path / "m.pth", model_config=TinyConfig(), model_state_dict={})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "m.pth", model_config={}, model_state_dict={}, format="x")


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    save_checkpoint(path, model_config={"v": 1}, model_state_dict={"w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # leave a half-written file behind, then die
            handle.truncate(len(Path(f).read_bytes()) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model_config={"v": 2}, model_state_dict={"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
    assert load_checkpoint(path)["model_config"] == {"v": 1}


def test_corrupt_files_give_one_line_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.pth", model_config={}, model_state_dict={"w": torch.ones(100)})
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "garbage.pth": bytes(range(256)) * 4,
        "empty.pth": b"",
        "text.pth": b"not a checkpoint",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match="corrupt or truncated") as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_foreign_files_are_refused_clearly(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(DataError, match="missing keys: format, format_version, model_config, model_state_dict"):
        load_checkpoint(tmp_path / "foreign.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(DataError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pth")
    torch.save({"model_config": {}, "model_state_dict": {}, "stats": np.zeros(2)}, tmp_path / "numpy.pth")
    with pytest.raises(DataError, match=r"objects other than tensors and plain data \(numpy"):
        load_checkpoint(tmp_path / "numpy.pth")


def test_config_mismatch_lists_the_differing_keys():
    saved = {"width": 16, "encoder": {"depth": 4, "norm": "group"}, "widths": [4, 8], "old": 1}
    current = {"width": 32, "encoder": {"depth": 4, "norm": "batch"}, "widths": (4, 8), "new": 2}
    with pytest.raises(ValueError) as info:
        check_config_matches(saved, current)
    message = str(info.value)
    for key in ("width (checkpoint 16 != model 32)", "encoder.norm", "old (only in checkpoint", "new (missing"):
        assert key in message
    assert "encoder.depth" not in message and "widths" not in message  # equal, tuple vs list
    check_config_matches(saved, saved)


def test_a_stage_compares_only_the_sections_it_names():
    # the DCG stage names {"dcg": ...}: a checkpoint written with the whole model config still
    # matches when only another section (the denoiser) changed, and not when its own did
    saved = {"dcg": {"width": 8}, "denoiser": {"image_ce_weight": 0.0}, "flat": 1}
    check_config_matches(saved, {"dcg": {"width": 8}, "flat": 1})
    with pytest.raises(ValueError, match="dcg.width"):
        check_config_matches(saved, {"dcg": {"width": 16}, "flat": 1})
    with pytest.raises(ValueError, match="flat \\(only in checkpoint"):  # a plain field is never skipped
        check_config_matches(saved, {"dcg": {"width": 8}})


def test_a_field_added_later_matches_an_older_checkpoint_at_its_old_value():
    from models.model_config import ADDED_LATER

    section, values = next(iter(ADDED_LATER.items()))
    field, old_value = next(iter(values.items()))
    saved = {section: {"width": 8}}  # written before the field existed
    check_config_matches(saved, {section: {"width": 8, field: old_value}})
    with pytest.raises(ValueError, match=f"{section}.{field}"):
        check_config_matches(saved, {section: {"width": 8, field: old_value + 0.5}})


def test_rng_state_restore_reproduces_random_numbers():
    gen = np.random.default_rng(11)
    tgen = torch.Generator().manual_seed(3)
    state = rng_state(numpy_generators={"data": gen}, torch_generators={"loader": tgen})
    first = (torch.rand(4), gen.random(4), torch.rand(4, generator=tgen), torch.nn.functional.dropout(torch.ones(8)))
    set_rng_state(state, numpy_generators={"data": gen}, torch_generators={"loader": tgen})
    again = (torch.rand(4), gen.random(4), torch.rand(4, generator=tgen), torch.nn.functional.dropout(torch.ones(8)))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


@pytest.mark.cuda
def test_cuda_rng_state_restore():
    state = rng_state()
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    first = torch.nn.functional.dropout(torch.ones(64, device="cuda"))
    set_rng_state(state)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64, device="cuda")), first)


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    gen = np.random.Generator(np.random.Philox(4))  # a bit generator whose state holds arrays
    save_checkpoint(tmp_path / "m.pth", model_config={}, model_state_dict={},
                    rng=rng_state(numpy_generators={"data": gen}))
    expected = (torch.rand(3), gen.random(3))
    fresh = np.random.Generator(np.random.Philox(99))
    set_rng_state(load_checkpoint(tmp_path / "m.pth")["rng"], numpy_generators={"data": fresh})
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(fresh.random(3), expected[1])


def test_rng_state_names_must_match():
    state = rng_state(numpy_generators={"data": np.random.default_rng(0)})
    with pytest.raises(ValueError, match="saved generators"):
        set_rng_state(state, numpy_generators={"augment": np.random.default_rng(0)})
