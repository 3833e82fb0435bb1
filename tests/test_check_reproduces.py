"""scripts/check_reproduces.py: a finished run's validation predictions come back from its
model file with the current code, a difference is reported, and the run folder is untouched."""
import re

import pytest

from utils.run import run_experiment
from utils.training.profiles import get_profile
from helpers import load_script

check_reproduces = load_script("check_reproduces")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    config = get_profile("smoke", progress=False, baselines=(), phantom_dir=str(tmp / "phantoms"))
    run_experiment(config, tmp / "run", cache_dir=tmp / "cache", device="cpu")
    return tmp


def _figures(out):
    diff = float(re.search(r"\|p_now - p_stored\| (\S+);", out).group(1))
    stored, now = (float(x) for x in re.search(r"AUC stored ([0-9.]+), now ([0-9.]+)", out).groups())
    return diff, stored, now


def test_a_finished_run_reproduces_its_validation_predictions_and_keeps_its_folder(smoke_run, capsys):
    provenance = (smoke_run / "run" / "provenance.json").read_text()
    assert check_reproduces.main([str(smoke_run / "run"), str(smoke_run / "phantoms")]) == 0
    diff, stored, now = _figures(capsys.readouterr().out)
    assert diff < 1e-5 and stored == now
    assert (smoke_run / "run" / "provenance.json").read_text() == provenance  # it ran on a copy


def test_a_changed_prediction_is_reported(smoke_run, capsys, monkeypatch):
    real = check_reproduces.predict_dataset

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        probs = out["probs"].clone()
        probs[:, 1] = 1 - probs[:, 1]  # an inverted model
        probs[:, 0] = 1 - probs[:, 1]
        return {**out, "probs": probs}

    monkeypatch.setattr(check_reproduces, "predict_dataset", shifted)
    check_reproduces.main([str(smoke_run / "run"), str(smoke_run / "phantoms")])
    diff, stored, now = _figures(capsys.readouterr().out)
    assert diff > 1e-3 and now == pytest.approx(1 - stored, abs=1e-9)
