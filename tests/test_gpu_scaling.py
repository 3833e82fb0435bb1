"""scripts/gpu_scaling.py: the speed-up and scaling-efficiency table from two runs' stage timings."""
from helpers import load_script

gpu_scaling = load_script("gpu_scaling")


def test_speedup_and_efficiency_per_stage():
    one = {"data": 5.0, "phase 1 (DCG)": 100.0, "phase 2 (diffusion)": 300.0, "3D ResNet-18": 80.0}
    two = {"data": 5.0, "phase 1 (DCG)": 50.0, "phase 2 (diffusion)": 200.0}  # no ResNet row in the 2-GPU run
    rows = gpu_scaling.scaling_table(one, two, 2)
    assert [r["stage"] for r in rows] == ["phase 1 (DCG)", "phase 2 (diffusion)"]  # data is no training stage
    assert rows[0]["speedup"] == 2.0 and rows[0]["efficiency"] == 1.0  # perfect scaling
    assert rows[1]["speedup"] == 1.5 and rows[1]["efficiency"] == 0.75
    text = gpu_scaling.markdown(rows, 2, "T4")
    assert "| phase 1 (DCG) | 100.0 | 50.0 | 2.00x | 100% |" in text and "| phase 2 (diffusion) | 300.0 | 200.0 | 1.50x | 75% |" in text
