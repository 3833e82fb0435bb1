"""Every run folder records where and with what it ran (a whole run folder, with its relative
paths and figures written once, is checked on the 2-process smoke run: tests/test_distributed.py)."""
import json
import subprocess

import pytest
import torch

from utils.paths import REPO_ROOT
from utils.provenance import collect, record

pytestmark = pytest.mark.usefixtures("one_thread")


def test_provenance_names_versions_commit_and_machine(tmp_path):
    entry = collect("cpu")
    assert entry["libraries"]["torch"] and entry["libraries"]["numpy"] and entry["python"].count(".") == 2
    assert entry["libraries"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert entry["git_commit"] == head and isinstance(entry["git_dirty"], bool)
    assert entry["device"] == "cpu" and entry["gpu"] is None and entry["cpu"]
    record(tmp_path, "cpu")
    record(tmp_path, "cpu")  # a resume appends, keeping the first start
    assert len(json.loads((tmp_path / "provenance.json").read_text())["starts"]) == 2
