"""The generic epoch loop: early stopping, model selection, atomic checkpoints, exact resume."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, ReduceLROnPlateau
from torch.utils.data import Dataset

from utils.training.checkpoint import load_checkpoint
from utils.errors import DataError
from utils.training.loop import FitConfig, best_weights_path, epoch_seed, fit, make_epoch_loader, stage_complete

CONFIG = {"model": "toy", "hidden": 8}


class ToyData(Dataset):
    """Two Gaussian blobs in 4-D; items are dicts like CTDataset's; records set_epoch calls."""

    def __init__(self, n=24, seed=0):
        rng = np.random.default_rng(seed)
        self.y = np.arange(n) % 2
        self.x = (rng.normal(size=(n, 4)) + 1.5 * self.y[:, None]).astype(np.float32)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.x[i]), "label": torch.tensor(self.y[i]), "index": i}


def toy_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))


class Harness:
    """A toy model trained with ``fit``; dropout (global RNG) and generator noise in the loss
    make every source of randomness matter for the resume test."""

    def __init__(self, scheduler="plateau", epochs=4, patience=10, metrics=None, fail_at=None):
        self.data, self.val = ToyData(), ToyData(n=12, seed=1)
        self.model = toy_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)
        self.scheduler = (ReduceLROnPlateau(self.optimizer, patience=0, factor=0.5) if scheduler == "plateau"
                          else CosineAnnealingWarmRestarts(self.optimizer, T_0=2))
        self.config = FitConfig(name="toy", epochs=epochs, patience=patience, grad_clip=1.0, seed=3, progress=False)
        self.metrics, self.fail_at, self.steps, self.evals = metrics, fail_at, 0, 0
        self.weights_after_epoch = []

    def train_step(self, batch, generator):
        self.steps += 1
        if self.fail_at is not None and self.steps == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        noise = torch.randn(batch["image"].shape, generator=generator) * 0.1
        logits = self.model(batch["image"] + noise)
        return nn.functional.cross_entropy(logits, batch["label"])

    def evaluate(self):
        self.weights_after_epoch.append({k: v.clone() for k, v in self.model.state_dict().items()})
        if self.metrics is not None:
            auc, loss = self.metrics[self.evals]
            self.evals += 1
            return {"val_loss": loss, "val_auc": auc, "val_acc": 0.5}
        x = torch.from_numpy(self.val.x)
        probs = torch.softmax(self.model(x), 1)[:, 1].numpy()
        loss = nn.functional.cross_entropy(self.model(x), torch.from_numpy(self.val.y)).item()
        return {"val_loss": loss, "val_auc": float(np.mean(probs[self.val.y == 1][:, None] > probs[self.val.y == 0])),
                "val_acc": float(np.mean((probs > 0.5) == self.val.y))}

    def run(self, path, model_config=CONFIG):
        return fit(self.model, self.optimizer, self.scheduler, train_step=self.train_step, evaluate=self.evaluate,
                   train_batches=lambda epoch: make_epoch_loader(self.data, 6, self.config.seed, epoch),
                   config=self.config, checkpoint_path=path, model_config=model_config, meta={"note": "toy"})


def test_epoch_seed_differs_per_epoch_and_stream():
    seeds = {epoch_seed(0, e, s) for e in range(5) for s in range(2)}
    assert len(seeds) == 10 and epoch_seed(0, 1) == epoch_seed(0, 1)


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    flat = [(0.7, 1.0)] * 10  # the first epoch is the best; nothing improves afterwards
    harness = Harness(epochs=10, patience=3, metrics=flat)
    torch.manual_seed(0)
    result = harness.run(tmp_path / "ckpt.pth")
    assert result.stopped_early and result.epochs_run == 4 and len(result.history["val_auc"]) == 4
    assert result.best["epoch"] == 1
    assert harness.data.epochs == [0, 1, 2, 3]  # set_epoch called once per epoch


@pytest.mark.parametrize("metrics, best_epoch", [
    ([(0.6, 1.0), (0.9, 2.0), (0.7, 0.1)], 2),  # highest AUC wins, even with a worse loss
    ([(0.8, 1.0), (0.8, 0.5), (0.8, 0.7)], 2),  # AUC tie: lower loss wins
    ([(math.nan, 1.0), (math.nan, 0.4), (math.nan, 0.9)], 2),  # AUC undefined: loss decides
])
def test_best_weights_are_kept_by_val_auc_then_loss(tmp_path, metrics, best_epoch):
    harness = Harness(epochs=3, metrics=metrics)
    torch.manual_seed(0)
    result = harness.run(tmp_path / "ckpt.pth")
    assert result.best["epoch"] == best_epoch and not result.stopped_early
    expected = harness.weights_after_epoch[best_epoch - 1]
    for key, value in harness.model.state_dict().items():
        assert torch.equal(value, expected[key])
    saved = load_checkpoint(tmp_path / "ckpt.pth")
    assert saved["fit"]["complete"] and saved["note"] == "toy"
    for key, value in saved["model_state_dict"].items():
        assert torch.equal(value, expected[key])


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_resume_after_crash_gives_identical_weights(tmp_path, scheduler):
    torch.manual_seed(0)
    reference = Harness(scheduler)
    ref_result = reference.run(tmp_path / "ref.pth")

    torch.manual_seed(0)
    crashed = Harness(scheduler, fail_at=4 * 2 + 2)  # 4 steps per epoch: dies in epoch 3
    with pytest.raises(KeyboardInterrupt):
        crashed.run(tmp_path / "run.pth")
    assert load_checkpoint(tmp_path / "run.pth")["fit"]["epoch"] == 2

    torch.manual_seed(12345)  # a new process: different global RNG, fresh model and optimizer
    resumed = Harness(scheduler)
    result = resumed.run(tmp_path / "run.pth")
    assert result.resumed_from == 2 and resumed.steps == 2 * 4
    assert result.history == ref_result.history and result.best == ref_result.best
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


def test_finished_stage_is_loaded_not_retrained(tmp_path):
    torch.manual_seed(0)
    first = Harness(epochs=2)
    first.run(tmp_path / "ckpt.pth")
    assert stage_complete(tmp_path / "ckpt.pth") and not stage_complete(tmp_path / "missing.pth")
    again = Harness(epochs=2)
    result = again.run(tmp_path / "ckpt.pth")
    assert again.steps == 0 and result.epochs_run == 2
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])


def test_checkpoint_loads_with_weights_only_mid_run_and_at_the_end(tmp_path):
    harness = Harness(epochs=3, fail_at=4 * 1 + 1)
    with pytest.raises(KeyboardInterrupt):
        harness.run(tmp_path / "ckpt.pth")
    mid = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert not mid["fit"]["complete"] and {"optimizer", "scheduler", "rng", "best_in"} <= set(mid["fit"])
    Harness(epochs=3).run(tmp_path / "ckpt.pth")
    end = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert end["fit"]["complete"] and end["model_config"] == CONFIG and "optimizer" not in end["fit"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    harness = Harness(epochs=3)
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the end-of-epoch-2 checkpoint: write half a file, then die
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 truncated")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        harness.run(tmp_path / "ckpt.pth")
    assert load_checkpoint(tmp_path / "ckpt.pth")["fit"]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # no temp file left behind


def test_checkpoint_of_another_model_config_is_refused_in_one_line_naming_file_and_field(tmp_path):
    Harness(epochs=1).run(tmp_path / "ckpt.pth")
    with pytest.raises(DataError, match=r"hidden \(checkpoint 8 != model 16\)") as info:
        Harness(epochs=1).run(tmp_path / "ckpt.pth", model_config={"model": "toy", "hidden": 16})
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'ckpt.pth'}: ") and "\n" not in message and "delete it" in message


def test_foreign_file_gives_a_one_line_error(tmp_path):
    (tmp_path / "ckpt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="ckpt.pth: corrupt or truncated"):
        Harness(epochs=1).run(tmp_path / "ckpt.pth")


def uninterrupted_and_killed(tmp_path, metrics):
    """An uninterrupted run (``ref.pth``, returned) and the same run killed in epoch 3
    (``run.pth`` holds epoch 2), both from the same seed."""
    torch.manual_seed(0)
    reference = Harness(metrics=metrics)
    reference.run(tmp_path / "ref.pth")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Harness(metrics=metrics, fail_at=4 * 2 + 1).run(tmp_path / "run.pth")
    return reference


@pytest.mark.parametrize("metrics, best_epoch", [
    ([(0.9, 1.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0)], 1),  # older than the checkpoint: stored apart
    ([(0.5, 1.0), (0.9, 1.0), (0.5, 1.0), (0.5, 1.0)], 2),  # the checkpoint's own weights
])
def test_resume_keeps_the_best_weights_seen_before_the_crash(tmp_path, metrics, best_epoch):
    reference = uninterrupted_and_killed(tmp_path, metrics)
    resumed = Harness(metrics=metrics)
    resumed.evals = 2  # the scripted metrics continue where the crashed run stopped
    result = resumed.run(tmp_path / "run.pth")
    assert result.best["epoch"] == best_epoch
    expected = reference.weights_after_epoch[best_epoch - 1]
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])
        assert torch.equal(value, expected[key])


def test_resume_file_holds_each_thing_once_and_the_best_weights_are_written_only_when_they_change(tmp_path, monkeypatch):
    """Epoch 1 improves, epochs 2-4 do not: the best weights go to their own file once (after
    epoch 2), never into the resume file; the finished stage keeps the best weights only."""
    import utils.training.loop as loop

    written = []
    real_save = loop.save_checkpoint

    def recording_save(path, **payload):
        written.append((Path(path).name, payload.get("fit", {}).get("epoch"), payload.get("best_of")))
        return real_save(path, **payload)

    monkeypatch.setattr(loop, "save_checkpoint", recording_save)
    metrics = [(0.9, 1.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0)]
    harness = Harness(metrics=metrics, fail_at=4 * 3 + 1)  # killed in epoch 4
    with pytest.raises(KeyboardInterrupt):
        harness.run(tmp_path / "ckpt.pth")
    assert written == [("ckpt.pth", 1, None), ("ckpt.best.pth", None, {"name": "toy", "epoch": 1}),
                       ("ckpt.pth", 2, None), ("ckpt.pth", 3, None)]
    mid = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert mid["fit"]["best_in"] == "ckpt.best.pth" and "best_state_dict" not in mid["fit"]
    assert mid["fit"]["disk"]["best_file_bytes"] == best_weights_path(tmp_path / "ckpt.pth").stat().st_size
    best = torch.load(best_weights_path(tmp_path / "ckpt.pth"), weights_only=True)["model_state_dict"]
    assert any(not torch.equal(best[k], v) for k, v in mid["model_state_dict"].items())  # not the current weights
    # resumed, it ends with epoch 1's weights, drops the best-weights file and the optimizer
    resumed = Harness(metrics=metrics)
    resumed.evals = 3
    assert resumed.run(tmp_path / "ckpt.pth").best["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]
    end = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert set(end["fit"]) >= {"history", "best", "disk"} and "optimizer" not in end["fit"]
    for key, value in end["model_state_dict"].items():
        assert torch.equal(value, best[key]) and torch.equal(value, resumed.model.state_dict()[key])
    disk = end["fit"]["disk"]
    # resume files of epochs 1-4 (sizes grow with the history) and the best weights once
    assert 3 * disk["resume_file_bytes"] + disk["best_file_bytes"] < disk["bytes_written"] \
        <= 4 * disk["resume_file_bytes"] + disk["best_file_bytes"]


def test_kill_between_the_best_file_and_the_resume_file_resumes_exactly(tmp_path, monkeypatch):
    """The best-weights file is written before the resume file that points at it: dying in
    between leaves the previous resume file, which still finds its best weights."""
    import utils.training.loop as loop

    metrics = [(0.5, 1.0), (0.9, 1.0), (0.5, 1.0), (0.5, 1.0)]
    torch.manual_seed(0)
    reference = Harness(metrics=metrics)
    reference.run(tmp_path / "ref.pth")

    real_save = loop.save_checkpoint

    def die_after_best(path, **payload):
        out = real_save(path, **payload)
        if "best_of" in payload:
            raise KeyboardInterrupt("killed after the best-weights file")
        return out

    monkeypatch.setattr(loop, "save_checkpoint", die_after_best)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Harness(metrics=metrics).run(tmp_path / "run.pth")
    assert load_checkpoint(tmp_path / "run.pth")["fit"]["epoch"] == 2  # epoch 3's resume file never written
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = Harness(metrics=metrics)
    resumed.evals = 2
    result = resumed.run(tmp_path / "run.pth")
    assert result.best["epoch"] == 2
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


def test_a_best_file_of_another_epoch_is_refused_in_one_line(tmp_path):
    metrics = [(0.9, 1.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0)]
    with pytest.raises(KeyboardInterrupt):
        Harness(metrics=metrics, fail_at=4 * 2 + 1).run(tmp_path / "ckpt.pth")
    best = best_weights_path(tmp_path / "ckpt.pth")
    saved = torch.load(best, weights_only=True)
    saved["best_of"]["epoch"] = 7
    torch.save(saved, best)
    with pytest.raises(DataError, match=r"ckpt.best.pth: holds the weights of epoch 7, but ckpt.pth needs epoch 1"):
        Harness(metrics=metrics).run(tmp_path / "ckpt.pth")


def test_a_resume_file_of_the_earlier_layout_still_resumes(tmp_path):
    """Files written before the separate best-weights file carried the best weights inside
    (``fit.best_state_dict``); they resume to the same weights."""
    metrics = [(0.9, 1.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0)]
    reference = uninterrupted_and_killed(tmp_path, metrics)
    path, best = tmp_path / "run.pth", best_weights_path(tmp_path / "run.pth")
    old = torch.load(path, weights_only=True)
    old["fit"]["best_state_dict"] = torch.load(best, weights_only=True)["model_state_dict"]
    del old["fit"]["best_in"], old["fit"]["disk"]
    torch.save(old, path)
    best.unlink()
    resumed = Harness(metrics=metrics)
    resumed.evals = 2
    assert resumed.run(path).best["epoch"] == 1
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


def test_checkpoint_keys_store_only_the_trained_part_and_leave_the_rest_alone(tmp_path):
    """A stage that trains the head of a model with a frozen trunk checkpoints the head only;
    resuming loads the head and does not touch the trunk the caller set up."""
    def build():
        torch.manual_seed(0)
        harness = Harness(epochs=2)
        for p in harness.model[0].parameters():
            p.requires_grad_(False)
        harness.optimizer = torch.optim.AdamW(harness.model[3].parameters(), lr=0.05)
        harness.scheduler = None
        return harness

    def run(harness, path):
        return fit(harness.model, harness.optimizer, None, train_step=harness.train_step,
                   evaluate=harness.evaluate, train_batches=lambda e: make_epoch_loader(harness.data, 6, 3, e),
                   config=harness.config, checkpoint_path=path, model_config=CONFIG,
                   checkpoint_keys=lambda key: key.startswith("3."))

    first = build()
    run(first, tmp_path / "head.pth")
    saved = torch.load(tmp_path / "head.pth", weights_only=True)["model_state_dict"]
    assert sorted(saved) == ["3.bias", "3.weight"]
    again = build()
    with torch.no_grad():
        again.model[0].weight.fill_(0.25)  # the caller's frozen trunk
    assert run(again, tmp_path / "head.pth").epochs_run == 2  # complete: only loads
    assert torch.equal(again.model[3].weight, first.model[3].weight)
    assert bool((again.model[0].weight == 0.25).all())
