"""The benchmark's stored sections (stamped with the code they measured, stale when it
changed), the checkpoint-size section and the GPU-memory estimate made without a GPU."""
import json
import math

import pytest
import torch

from utils.benchmarking import sections as sec
from utils.benchmarking.memory_estimate import CUDA_OVERHEAD_GB, estimate_peak, largest_batch
from utils.benchmarking.report import Report
from utils.benchmarking.suite import assemble


def _tree(root):
    for rel, text in {"models/a.py": "x = 1\n", "utils/b.py": "y = 2\n", "utils/benchmarking/report.py": "# formatting\n",
                      "utils/benchmarking/speed.py": "# speed\n", "utils/benchmarking/memory.py": "# memory\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_fingerprint_follows_the_measuring_code_not_the_report_or_other_sections(tmp_path):
    _tree(tmp_path)
    speed, memory = sec.code_fingerprint("speed", tmp_path), sec.code_fingerprint("memory", tmp_path)
    (tmp_path / "utils/benchmarking/report.py").write_text("# reworded\n")
    (tmp_path / "utils/benchmarking/memory.py").write_text("# memory, edited\n")
    assert sec.code_fingerprint("speed", tmp_path) == speed  # neither is speed's code
    assert sec.code_fingerprint("memory", tmp_path) != memory
    (tmp_path / "models/a.py").write_text("x = 3\n")  # the model: every section measures it
    assert sec.code_fingerprint("speed", tmp_path) != speed
    with pytest.raises(ValueError, match="unknown benchmark section"):
        sec.code_fingerprint("speeds", tmp_path)


def _record(name, fingerprint, status="met"):
    report = Report()
    report.text(f"## {name} heading\n\nbody of {name}")
    report.add(name, "item", "metric", 1.5, unit="s")
    report.check(f"{name} goal", 1.5, status == "met", "1.50")
    return sec.SectionRecord(name, report.blocks, report.rows, report.targets, 2.0, "python -m utils.benchmark",
                             {"cpu": "test", "cores": 2, "torch_threads": 1, "device": "cpu"}, "abc1234", False,
                             fingerprint)


def test_report_marks_a_section_measured_on_other_code_as_stale_and_an_absent_one_as_not_measured(tmp_path):
    sec.save_section(tmp_path, _record("speed", sec.code_fingerprint("speed")))
    sec.save_section(tmp_path, _record("memory", "0" * 16, status="missed"))
    text = assemble(tmp_path).read_text()
    speed, memory = text.index("## speed heading"), text.index("## memory heading")
    assert "**Stale**" not in text[speed:memory]  # measured on this code
    stale_block = text[memory:]
    assert "**Stale**: measured on code `00000000`" in stale_block
    assert "python -m utils.benchmark --sections memory" in stale_block
    targets = text[text.index("## Targets"):text.index("## 1. Quality")]
    assert "| speed goal | 1.50 | **met** |" in targets and "| memory goal | (stale) 1.50 | **missed** |" in targets
    assert "Not measured here: run `python -m utils.benchmark --sections design`" in text
    rows = (tmp_path / "benchmark.csv").read_text()
    assert "speed,item,metric,1.5" in rows and "memory,item,metric,1.5" in rows


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark section"):
        sec.save_section(tmp_path, _record("speeds", "x"))
    from utils.benchmarking.suite import run_benchmark
    with pytest.raises(ValueError, match=r"unknown benchmark section\(s\) \['spead'\]"):
        run_benchmark(tmp_path, quick=True, sections=["spead"])


def test_stored_section_round_trips_as_json(tmp_path):
    record = _record("scaling", "f" * 16)
    path = sec.save_section(tmp_path, record)
    assert json.loads(path.read_text())["fingerprint"] == "f" * 16
    loaded = sec.load_section(tmp_path, "scaling")
    assert (loaded.blocks, loaded.targets, loaded.stamp()) == (record.blocks, record.targets, record.stamp())
    assert loaded.rows[0]["value"] == 1.5 and math.isnan(loaded.rows[0]["spread"])  # NaN survives JSON
    assert sec.load_section(tmp_path, "design") is None


# ------------------------------------------------------------------------------------------
# GPU memory without a GPU
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["dcg", "diffusion", "resnet18"])
def test_fake_tensor_estimate_equals_the_peak_tracked_on_real_tensors(stage):
    """The estimate computes nothing; the same two steps on real CPU tensors (2-byte autocast
    as well) reach the same tracked peak: shapes, not values, set the memory."""
    shape, batch = (32, 32, 16), 2
    fake = estimate_peak(stage, shape, "tiny", batch, profile="smoke")
    real = estimate_peak(stage, shape, "tiny", batch, profile="smoke", fake=False)
    assert fake["total"] > 0 and fake["total"] == pytest.approx(real["total"], rel=0.15)
    assert fake["parameter"] == pytest.approx(real["parameter"], rel=1e-6)
    assert fake["optstate"] > 0 and fake["activation"] > 0


def test_estimate_grows_with_the_batch_by_the_activations():
    one = estimate_peak("dcg", (32, 32, 16), "tiny", 1, profile="smoke")
    four = estimate_peak("dcg", (32, 32, 16), "tiny", 4, profile="smoke")
    assert four["activation"] > 2.5 * one["activation"] and four["parameter"] == one["parameter"]


def test_largest_batch_follows_the_line_and_checks_it(monkeypatch):
    """Peak = 2 + 0.5 b GiB: with 14.5 GiB and the overhead, b = floor((14.5 - 1 - 2) / 0.5) = 23."""
    import utils.benchmarking.memory_estimate as me
    asked = []

    def line(stage, shape, preset, b, **kwargs):
        asked.append(b)
        return {"total": 2 + 0.5 * b + (3 if b == 23 else 0)}  # 23 does not fit after all: step down

    monkeypatch.setattr(me, "estimate_peak", line)
    batch, peak = largest_batch("dcg", (8, 8, 8), "tiny", 14.5, {1: 2.5, 4: 4.0})
    assert (batch, peak) == (22, 13.0) and asked == [23, 22]
    assert largest_batch("dcg", (8, 8, 8), "tiny", 1.0 + CUDA_OVERHEAD_GB, {1: 2.5, 4: 4.0}) == (0, 2.5)
    assert largest_batch("dcg", (8, 8, 8), "tiny", 100.0, {1: 2.5, 4: 4.0}, limit=8)[0] == 8


# ------------------------------------------------------------------------------------------
# checkpoint sizes
# ------------------------------------------------------------------------------------------

def test_lean_layout_is_smaller_than_the_earlier_one_for_every_stage():
    from utils.benchmarking.checkpoints import stage_layouts
    layouts = stage_layouts("smoke")
    assert len(layouts) == 4
    for stage, sizes in layouts.items():
        assert sizes["resume"] < sizes["earlier"], stage  # no second copy of the weights any more
        assert sizes["finished"] == sizes["best"] < sizes["resume"], stage  # weights only vs + optimizer
    phase1 = next(v for k, v in layouts.items() if k.startswith("phase 1"))
    phase2 = next(v for k, v in layouts.items() if k.startswith("phase 2"))
    assert phase1["finished"] < phase2["finished"]  # the DCG alone, not the whole untrained model
    assert all(math.isfinite(v) for sizes in layouts.values() for v in sizes.values())
