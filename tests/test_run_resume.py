"""The whole experiment (smoke profile) survives SIGKILL: a killed run, started again, ends with
exactly the metrics and weights of an uninterrupted run with the same seed.

The run that is killed is ``python -m utils.run --profile smoke`` in a subprocess; the runs after
it (the resumed one, the uninterrupted one, a restart of a finished run) call ``utils.run.main``
in this process, which has torch, scikit-learn and MONAI imported already (about 15 s a process
on 2 CPU cores). Every run uses one intra-op thread, so all do their floating-point reductions
in the same order (and a busy machine does not slow OpenMP down by oversubscription).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.run import main
from utils.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(output_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--profile", "smoke", "--output-dir", str(output_dir), "--cache-dir", str(tmp_path / "cache"),
            "--set", f"phantom_dir={tmp_path / 'phantoms'}", "--device", "cpu",
            "--set", "baselines=resnet18", *extra]  # DenseNet-121 trains through the same fit loop


def start(output_dir: Path, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDISCOPE_DATA_DIR", "MEDISCOPE_DEVICE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "utils.run", *run_args(output_dir, tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_here(output_dir: Path, tmp_path: Path, capsys, *extra: str) -> str:
    """``utils.run`` started again, in this process: its stdout."""
    capsys.readouterr()
    code = main(run_args(output_dir, tmp_path, *extra))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return out


CHECKPOINTS = ("dcg.pth", "diffusion.pth", "resnet18.pth")


def state_dicts(output_dir: Path) -> dict:
    files = [output_dir / "diffmic3d_enhanced_model.pth", *(output_dir / "checkpoints" / name for name in CHECKPOINTS)]
    return {f.name: load_checkpoint(f)["model_state_dict"] for f in files}


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDISCOPE_DATA_DIR", raising=False)
    monkeypatch.delenv("MEDISCOPE_DEVICE", raising=False)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    process = start(killed_dir, tmp_path)
    deadline = time.monotonic() + 90
    while not (killed_dir / "checkpoints" / "dcg.pth").exists():  # the first end-of-epoch checkpoint
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "evaluation_results.csv").exists()

    resumed_log = run_here(killed_dir, tmp_path, capsys)
    # the DCG continues from its checkpoint (or, killed after its last epoch, is only loaded)
    assert "[dcg] resuming after epoch" in resumed_log or "[dcg] finished earlier, loaded" in resumed_log
    clean_log = run_here(clean_dir, tmp_path, capsys)
    assert "resuming" not in clean_log and "Test split" in clean_log

    for name in ("evaluation_results.csv", "predictions.csv", "history.json", "splits.csv"):
        assert (killed_dir / name).read_text() == (clean_dir / name).read_text(), name
    killed, clean = state_dicts(killed_dir), state_dicts(clean_dir)
    assert not list(killed_dir.rglob(".*.tmp*")), "temporary files of the killed run were not cleaned up"
    for name in clean:
        for key, value in clean[name].items():
            assert torch.equal(value, killed[name][key]), f"{name}: {key}"

    # a finished run started again trains nothing (its evaluation reproduces: killed vs clean above)
    again = run_here(clean_dir, tmp_path, capsys, "--train-only")
    assert all(f"[{stage}] finished earlier, loaded" in again for stage in ("dcg", "diffusion", "resnet18"))
    assert "done:" not in again  # no stage trained


def test_output_dir_of_another_configuration_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_config.json").write_text('{"profile": "demo"}')
    assert main(run_args(tmp_path / "out", tmp_path)) == 2
    assert "holds a run with another configuration" in capsys.readouterr().err
