"""MONAI is optional: without it the baselines and their Grad-CAM are skipped with one line each call.

MONAI's absence is simulated in a fresh interpreter (``sys.modules['monai'] = None`` makes every
``import monai`` fail, as when it is not installed), on the calls notebooks 06 / 07 and
``utils.run`` make: ``train_baselines`` (in ``finish_training`` / ``train_all``), ``load_baselines``
and the Grad-CAM figure of ``evaluate_test``.
"""
import subprocess
import sys

from utils.paths import REPO_ROOT
from utils.training.baselines import runnable_baselines

WITHOUT_MONAI = """
import sys, types
sys.modules["monai"] = None  # every `import monai...` now raises ImportError, as when it is not installed
from utils.pipeline import load_baselines, train_baselines  # the pipeline imports without MONAI
from utils.evaluation.gradcam import write_baseline_gradcam
from utils.training.baselines import build_baseline
from utils.training.profiles import get_profile

exp = types.SimpleNamespace(config=get_profile("smoke"))  # both baselines asked for
print("trained:", train_baselines(exp))
print("loaded:", load_baselines(exp, "notebook 06_training"))
print("grad-cam figure:", write_baseline_gradcam({}, {}, [], [], sys.argv[1], ["Normal", "COVID-19"]))
print("none asked:", train_baselines(types.SimpleNamespace(config=get_profile("smoke", baselines=()))))
try:
    build_baseline("resnet18", 2)
except ImportError:
    print("build_baseline: ImportError")
"""


def test_without_monai_the_baselines_and_gradcam_are_skipped_with_one_line_each(tmp_path):
    run = subprocess.run([sys.executable, "-c", WITHOUT_MONAI, str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    skipped = [line for line in lines if line.startswith("baselines skipped: MONAI cannot be imported")]
    assert len(skipped) == 2  # one for training (notebook 06), one for loading (notebook 07); none when none asked
    assert "Grad-CAM" in skipped[0] and "pip install 'monai>=1.3'" in skipped[0] and "wheels dataset" in skipped[0]
    assert {"trained: {}", "loaded: {}", "grad-cam figure: None", "none asked: {}",
            "build_baseline: ImportError"} <= set(lines)
    assert not (tmp_path / "figures").exists()


def test_with_monai_every_asked_baseline_runs_and_nothing_is_said(capsys):
    assert runnable_baselines(("resnet18", "densenet121")) == ("resnet18", "densenet121")
    assert runnable_baselines(()) == ()
    assert capsys.readouterr().out == ""


def test_the_skip_line_is_printed_once_per_call(monkeypatch, capsys):
    monkeypatch.setattr("utils.training.baselines.monai_missing", lambda: "baselines skipped: (reason)")
    assert runnable_baselines(("resnet18",)) == ()
    assert capsys.readouterr().out == "baselines skipped: (reason)\n"
