"""Library messages go through logging (the ``mediscope`` logger), not bare prints."""
import logging

from utils.log import ROOT, get_logger


def test_messages_reach_stdout_by_default_and_the_level_silences_them(capsys):
    log = get_logger("utils.training.loop")
    assert log.name == "mediscope.training.loop" and logging.getLogger(ROOT).handlers
    log.info("[dcg] epoch 1/2 train_loss 0.5")
    assert capsys.readouterr().out == "[dcg] epoch 1/2 train_loss 0.5\n"
    root = logging.getLogger(ROOT)
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        log.info("hidden")
        assert capsys.readouterr().out == ""
    finally:
        root.setLevel(level)


def training_log(run, level=logging.INFO) -> list[str]:
    """The ``mediscope.training.loop`` messages at ``level`` and above while ``run()`` trains."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger(ROOT)
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        run()
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    return [r.getMessage() for r in records if r.name == "mediscope.training.loop" and r.levelno >= level]


def harness(epochs, name="toy", log_every=5, **kwargs):
    from dataclasses import replace
    from test_trainer import Harness
    h = Harness(epochs=epochs, **kwargs)
    h.config = replace(h.config, name=name, log_every=log_every)
    return h


def test_a_stage_prints_one_summary_line_and_every_epoch_goes_to_debug(tmp_path):
    results = []
    lines = training_log(lambda: results.append(harness(2).run(tmp_path / "ckpt.pth")))
    best = results[0].best
    assert lines == [lines[0]] and lines[0].startswith(
        f"[toy] done: 2/2 epochs; selected epoch {best['epoch']}: val AUC {best['val_auc']:.3f}, ")
    assert lines[0].endswith(" s")
    debug = training_log(lambda: harness(2).run(tmp_path / "again.pth"), logging.DEBUG)
    assert [m.split(" train_loss")[0] for m in debug[:2]] == ["[toy] epoch 1/2", "[toy] epoch 2/2"]
    assert len(debug) == 3 and debug[2].startswith("[toy] done:")
    loaded = training_log(lambda: harness(2).run(tmp_path / "ckpt.pth"))  # finished: only loaded
    assert loaded == [f"[toy] finished earlier, loaded: 2 epochs; selected epoch {best['epoch']}: "
                      f"val AUC {best['val_auc']:.3f}"]


def test_a_fold_stage_carries_its_name_with_a_line_every_n_epochs(tmp_path):
    lines = training_log(lambda: harness(7, name="dcg fold 2/3", log_every=3).run(tmp_path / "fold.pth"))
    assert all(line.startswith("[dcg fold 2/3] ") for line in lines)
    assert [line.split(":")[0] for line in lines] == ["[dcg fold 2/3] epoch 3/7", "[dcg fold 2/3] epoch 6/7",
                                                      "[dcg fold 2/3] done"]
    assert "best so far epoch " in lines[0] and "s/epoch" in lines[0]
    assert sum("done:" in line for line in lines) == 1  # one summary line per stage


def test_early_stop_is_said_in_the_summary(tmp_path):
    flat = [(0.7, 1.0)] * 10
    lines = training_log(lambda: harness(10, patience=3, metrics=flat, log_every=0).run(tmp_path / "c.pth"))
    assert lines == [lines[0]] and lines[0].startswith(
        "[toy] done: 4/10 epochs (early stop: no better validation AUC for 3 epochs); selected epoch 1: val AUC 0.700")


def test_train_dcg_hands_its_stage_name_to_the_loop(monkeypatch):
    from models.diffmic3d import DiffMIC3D, ModelConfig
    from utils.training import dcg
    from utils.training.profiles import get_profile
    seen = []
    monkeypatch.setattr(dcg, "fit", lambda *args, config, **kwargs: seen.append(config.name))
    model = DiffMIC3D(ModelConfig.tiny(input_shape=(32, 32, 32)))
    for name in ("dcg", "dcg fold 1/3"):
        dcg.train_dcg(model, list(range(8)), [], get_profile("smoke"), "cpu", "unused.pth",
                      **({} if name == "dcg" else {"name": name}))
    assert seen == ["dcg", "dcg fold 1/3"]


def test_summary_line_format():
    from utils.training.epoch_log import progress_line, summary_line
    best = {"epoch": 16, "val_auc": 0.75, "val_loss": 0.24841, "val_acc": 0.6875}
    assert summary_line("diffusion", 23, 40, best, 124.4, True, 7) == (
        "[diffusion] done: 23/40 epochs (early stop: no better validation AUC for 7 epochs); selected epoch 16: "
        "val AUC 0.750, val loss 0.2484, val acc 0.688; 124 s")
    assert summary_line("dcg fold 1/3", 20, 20, best, 3.21, False, 7, resumed_from=12).endswith(
        "20/20 epochs; selected epoch 16: val AUC 0.750, val loss 0.2484, val acc 0.688; 3.2 s, resumed after epoch 12")
    row = {"train_loss": 0.3, "val_loss": 0.25, "val_auc": 0.7}
    assert "best so far" not in progress_line("dcg", 5, 20, row, {"epoch": 0}, 1.0)  # nothing selectable yet
