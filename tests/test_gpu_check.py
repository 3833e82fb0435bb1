"""scripts/gpu_check.sh without a GPU: a stand-in ``python`` (``$PYTHON``) that says CUDA is
there and records what it is asked to run, so the stage selection, the failure report and the
exit status are checked here; what the stages measure is checked on a GPU by the script itself."""
import os
import subprocess
from pathlib import Path

import pytest

from utils.paths import REPO_ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1 $2" in
  "-m utils.run") exit 3 ;;                      # the full run fails
  "-m pytest") echo "5 passed in 1.0s" ;;
  "- ") cat > /dev/null; echo "card: stand-in" ;;  # the card line (a heredoc on stdin)
  "-c "*device_count*) echo 1 ;;
esac
exit 0
"""


def gpu_check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "GPU_CHECK_DIR": str(out),
                                 **env}, timeout=60)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    return result, summary, calls.read_text().splitlines()


def test_only_the_chosen_stages_run_and_a_failed_one_sets_the_exit_status(tmp_path):
    result, summary, calls = gpu_check(tmp_path, GPU_CHECK_STAGES="notebooks run")
    assert result.returncode == 1, result.stderr
    ran = [c.split()[1] for c in calls if c.startswith("-m ")]
    assert ran == ["utils.run", "utils.run_notebooks"]  # the script's order, not the variable's
    assert "run_fp16" in summary and "FAILED (rc 3" in summary
    assert any(line.startswith("notebooks") and line.endswith("ok") for line in summary.splitlines())
    assert "tests" not in "".join(summary.splitlines()[2:]) and not any("device_count" in c for c in calls)


def test_a_second_call_appends_to_the_summary(tmp_path):
    gpu_check(tmp_path, GPU_CHECK_STAGES="memory")
    result, summary, _ = gpu_check(tmp_path, GPU_CHECK_STAGES="tests")
    assert result.returncode == 0, result.stderr
    assert summary.count("card: stand-in") == 2 and "memory " in summary and "tests: 5 passed" in summary


def test_the_older_switch_still_drops_the_tests(tmp_path):
    _, _, calls = gpu_check(tmp_path, GPU_CHECK_TESTS="0", GPU_CHECK_STAGES="tests memory")
    assert [c.split()[1] for c in calls if c.startswith("-m ")] == ["utils.benchmark"]


@pytest.mark.parametrize("stages", ["notebook", "tests gpu"])
def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path, stages):
    result, summary, calls = gpu_check(tmp_path, GPU_CHECK_STAGES=stages)
    assert result.returncode == 2 and "unknown stage" in result.stderr and "choose from" in result.stderr
    assert calls == [] and summary == ""
