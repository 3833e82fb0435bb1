"""Throughput of 1 vs N GPUs per training stage (README, "Several GPUs").

    python scripts/gpu_scaling.py [--gpus N] [--profile full] [--epochs 2] [--output-dir outputs/gpu_scaling]

Trains the same short run twice with ``utils.run --train-only``, on one GPU and on N (default:
every visible GPU), each into its own folder (``gpus1/``, ``gpusN/``): ``--epochs`` epochs per
stage, two out-of-fold DCGs, ResNet-18 as the only baseline. Each run's stage times
(``timings.json``: phase 1 = the final DCG; phase 2 = the out-of-fold DCGs spread over the
ranks, the guidance cache and the diffusion stage; the ResNet-18) give per stage the speed-up
T1 / TN and the scaling efficiency T1 / (N x TN), the issue's goal being a speed-up >= 1.7 on two
GPUs. The table goes to standard output and ``OUTPUT_DIR/scaling.md``. Where torch sees no CUDA
device the N runs are N CPU processes (gloo): a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("phase 1 (DCG)", "phase 2 (diffusion)", "3D ResNet-18")


def scaling_table(one: dict, many: dict, n: int) -> list[dict]:
    """Per stage of :data:`STAGES` present in both timings: seconds on 1 and on ``n``, speed-up, efficiency."""
    rows = []
    for stage in STAGES:
        if stage in one and stage in many and many[stage] > 0:
            speedup = one[stage] / many[stage]
            rows.append({"stage": stage, "seconds_1": one[stage], f"seconds_{n}": many[stage],
                         "speedup": speedup, "efficiency": speedup / n})
    return rows


def markdown(rows: list[dict], n: int, device: str) -> str:
    lines = [f"Scaling on {device}: 1 vs {n} processes (`scripts/gpu_scaling.py`)", "",
             f"| stage | 1 process (s) | {n} processes (s) | speed-up | efficiency |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds_1']:.1f} | {r[f'seconds_{n}']:.1f} | {r['speedup']:.2f}x | "
              f"{r['efficiency']:.0%} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--gpus", default="auto", help="N for the many-GPU run (default: every visible GPU)")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "gpu_scaling")
    args, extra = parser.parse_known_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    n = (torch.cuda.device_count() if cuda else 2) if args.gpus == "auto" else int(args.gpus)
    if n < 2:
        print("error: one GPU visible; the scaling needs two or more", file=sys.stderr)
        return 2
    e = args.epochs
    sets = [f"dcg_epochs={e}", f"diffusion_epochs={e}", f"baseline_epochs={e}", f"patience={e}", "oof_folds=2",
            "baselines=resnet18", "progress=False"]
    timings = {}
    for gpus in (1, n):
        out = args.output_dir / f"gpus{gpus}"
        command = [sys.executable, "-m", "utils.run", "--profile", args.profile, "--output-dir", str(out),
                   "--gpus", str(gpus), "--train-only", *[a for s in sets for a in ("--set", s)], *extra]
        if not cuda:
            command += ["--device", "cpu"]
        print(f"$ {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)
        timings[gpus] = json.loads((out / "timings.json").read_text())
    device = torch.cuda.get_device_name(0) if cuda else "CPU (gloo processes: a check, not a measurement)"
    text = markdown(scaling_table(timings[1], timings[n], n), n, device)
    (args.output_dir / "scaling.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
