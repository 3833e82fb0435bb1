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


def test_training_reports_epochs_through_the_log(tmp_path):
    from test_trainer import Harness

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(ROOT).addHandler(handler)
    try:
        Harness(epochs=2).run(tmp_path / "ckpt.pth")
    finally:
        logging.getLogger(ROOT).removeHandler(handler)
    epochs = [r.getMessage() for r in records if r.name == "mediscope.training.loop"]
    assert [m.split(" train_loss")[0] for m in epochs] == ["[toy] epoch 1/2", "[toy] epoch 2/2"]
