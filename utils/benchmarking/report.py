"""The benchmark report: rows for the CSV, markdown blocks and the targets table; the names
and targets every section shares; the machine a report was measured on."""
from __future__ import annotations

import csv
import io
import math
import os
import platform
from pathlib import Path
from typing import Optional

import torch

OURS, DCG_FUSED, RESNET = "DiffMIC-3D", "DCG without diffusion", "3D ResNet-18"
TARGETS = {
    "full_train_minutes": 45.0,
    "phase2_over_phase1": 0.25,
    "inference_over_dcg": 1.3,  # DiffMIC-3D predict (20 chains x 10 DDIM steps) / one DCG forward
    "inference_over_resnet": 1.5,  # ... / a ResNet-18 forward
    "full_peak_gb": 6.0,
    "main_job_minutes": 8.0,  # `bash run.sh` (demo) on the 2-core CPU after set-up
}
STATUSES = ("met", "missed", "not measured")


class Report:
    """Rows for the CSV, markdown blocks and target rows for the report, in the order added."""

    def __init__(self):
        self.rows: list[dict] = []
        self.blocks: list[str] = []
        self.targets: list[dict] = []

    def add(self, section: str, item: str, metric: str, value: float, spread: float = float("nan"),
            unit: str = "") -> float:
        self.rows.append({"section": section, "item": item, "metric": metric, "value": float(value),
                          "spread": float(spread), "unit": unit})
        return float(value)

    def text(self, block: str) -> None:
        self.blocks.append(block.rstrip() + "\n")

    def target(self, name: str, status: str, measured: str, value: Optional[float] = None) -> str:
        """One row of the targets table: ``status`` is ``met``, ``missed`` or ``not measured``
        (then ``measured`` says why); ``value`` also goes to the CSV (section ``targets``)."""
        if status not in STATUSES:
            raise ValueError(f"target status must be one of {STATUSES}, got {status!r}")
        if status == "not measured" and not measured.strip():
            raise ValueError(f"target {name!r}: 'not measured' needs a stated reason")
        self.targets.append({"target": name, "measured": measured, "status": status})
        if value is not None and status != "not measured":
            self.add("targets", name, "measured", value)
        return status

    def check(self, name: str, value: float, ok: bool, measured: str) -> str:
        """A measured target: met iff ``ok``."""
        return self.target(name, "met" if ok else "missed", measured, value)

    def targets_table(self) -> str:
        return markdown_table(["target", "measured", "status"],
                              [[t["target"], t["measured"], f"**{t['status']}**"] for t in self.targets])

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["section", "item", "metric", "value", "spread", "unit"],
                                lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else
                                 ("" if isinstance(v, float) else v)) for k, v in row.items()})
        return buffer.getvalue()


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, torch version, device (and GPU name) of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def met_text(ok: bool) -> str:
    """``**met**`` or ``**missed**``, for the prose beside a table."""
    return "**met**" if ok else "**missed**"
