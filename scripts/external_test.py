"""Score finished runs once more, on an external test set: new scans that none of their models saw.

    python scripts/external_test.py RUNS_DIR DATA EXTERNAL_DIR [--phantoms N --phantom-seed S]
                                    [--seeds S ...] [--ablations] [--out DIR] [--n-resamples R]

RUNS_DIR holds finished runs of the quality benchmark (``quality_<data>_seed<s>``), DATA is
``phantoms`` or the scan folder they ran on (``utils.benchmarking.quality.run_setup``), and
EXTERNAL_DIR a MosMedData-layout folder of labelled scans. With ``--phantoms N`` that folder is
first written as N new phantoms (balanced) from generator seed S, at the runs' phantom settings;
S must differ from the seed of the runs' own phantoms, whose scans come from the same streams.

Why: the phantom benchmark gives each seed its own 60 test scans, and five seeds of 60 scans do
not resolve a 0.02 AUC difference (the primary interval is 0.07 wide). Its models are cheap to
score, and phantoms are cheap to draw: scoring every seed's finished models on one large set of
new scans narrows the scan part of the interval, and the seeds then share their scans, so
DeLong's test on the seed-averaged predictions applies too. The seeds' own spread stays.

Every model of the run scores the external scans as the run scored its test split
(``utils.pipeline.predict_split``: DiffMIC-3D with its chains over its prior members, its DCG's
global prior and fused prediction, the DCG ensemble, the baselines), each at the decision
threshold the run chose on its validation split (``val_predictions.csv``; DiffMIC-3D's stored
one). Nothing is selected or fitted on the external scans. A scan whose network input equals
that of one of the run's own scans is refused. Each seed's predictions are written once, to
``OUT/external_runs/<external>/<run>/predictions.csv``, and read, never scored again, after
that. The report (``OUT/quality_<name>_external_<external>.md`` and ``.csv``,
``risk_coverage_<name>_external_<external>.png``) is the quality benchmark's pooled analysis and
goals (``utils.benchmarking.quality``) on those predictions, the referral of ``utils.predict`` on
the new scans, and with ``--ablations`` the quality benchmark's inference-only ablations of every
seed's DiffMIC-3D on them (cached beside its predictions in ``ablations.npz``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.crossfit_correction import read_npz, seed_runs  # noqa: E402
from utils.atomic import atomic_path, atomic_write_text  # noqa: E402
from utils.benchmarking.pooled import analyse, read_split  # noqa: E402
from utils.benchmarking.quality import (csv_rows, dataset_setup, goals, open_finished_run,  # noqa: E402
                                        render_results, run_setup, write_pooled_figure)
from utils.benchmarking.report import DCG_FUSED, OURS  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.evaluation.selective import errors_of  # noqa: E402
from utils.paths import REPO_ROOT  # noqa: E402

SCORED = "external.json"  # beside each seed's predictions: which external set they are of
ABLATIONS = "ablations.npz"  # beside them, with --ablations: the inference-only variants' probabilities


def write_phantoms(run_dir: Path, data: str, out: Path, n: int, seed: int) -> None:
    """``n`` new phantoms (balanced) into ``out`` from generator seed ``seed``, with the generator
    settings and layout of the phantoms the run was trained on (``utils.data.phantom_masks.phantom_scan``)."""
    from utils.data.discovery import discover_scans, find_dataset_root
    from utils.data.phantom_masks import phantom_scan
    from utils.data.phantoms import write_dataset
    from utils.prepare_data import PHANTOM_LAYOUTS, phantom_folder

    config, data_dir = run_setup(run_dir, data)
    folder = data_dir if data_dir is not None else phantom_folder(config)
    own = phantom_scan(discover_scans(find_dataset_root(folder)[0], config.label_mode)[0].path)
    if own is None:
        raise SystemExit(f"--phantoms: the scans of {run_dir.name} ({folder}) are not a complete phantom set")
    if seed == own.seed:
        raise SystemExit(f"--phantom-seed {seed} is the seed of the runs' own phantoms, whose scan i would be "
                         "the same scan; choose another")
    write_dataset(out, n, seed, PHANTOM_LAYOUTS[config.label_mode], own.config)  # minutes: with its bar


def input_digests(cache, paths) -> dict[str, str]:
    """Network-input digest -> scan path (the preprocessed volume's bytes)."""
    return {hashlib.sha256(cache.get(p).tobytes()).hexdigest(): str(p) for p in paths}


def external_dataset(exp, external: Path):
    """(CTDataset of the scans under ``external``, their folder) in the run's preprocessing;
    refused when a scan's network input is one of the run's own scans'."""
    from utils.data.dataset import CTDataset
    from utils.data.discovery import discover_scans, find_dataset_root

    if exp.layout == "medmnist":
        raise SystemExit(f"{exp.output_dir.name} ran on a MedMNIST .npz, whose scans are its official split; an "
                         "external set needs runs on scan folders (phantoms or MosMedData)")
    root, _ = find_dataset_root(external)
    records = discover_scans(root, exp.config.label_mode)
    for cache in filter(None, (exp.cache, exp.hires_cache)):
        cache.warm([r.path for r in records])  # with its bar: the benchmark runs' configs have them off
    own = input_digests(exp.cache, [r.path for r in exp.records])
    seen = [(path, own[d]) for d, path in input_digests(exp.cache, [r.path for r in records]).items() if d in own]
    if seen:
        raise SystemExit(f"{len(seen)} external scans are scans of the run itself, e.g. {seen[0][0]} = {seen[0][1]}")
    return CTDataset(records, exp.cache, hires_cache=exp.hires_cache), root


def open_external(run_dir: Path, data: str, external: Path):
    """(the run's experiment with the external scans as its one split ``external``, its
    finished DiffMIC-3D, the scans' folder)."""
    exp, model = open_finished_run(run_dir, data)
    dataset, root = external_dataset(exp, external)
    scoring = dataclasses.replace(exp, config=dataclasses.replace(exp.config, progress=True),
                                  datasets={"external": dataset}, data_root=root)
    return scoring, model, root


def score_run(run_dir: Path, data: str, external: Path, out: Path) -> Path:
    """The run's models on the external scans, once: ``out/predictions.csv`` (written, or read
    when a previous call scored the same external set), each model at its validation threshold."""
    from utils.evaluation.evaluate import write_predictions_csv
    from utils.pipeline import load_baselines, predict_split

    identity = {"external": str(Path(external).resolve()), "run": str(Path(run_dir).resolve())}
    done = out / SCORED
    if done.is_file():
        if json.loads(done.read_text()) != identity:
            raise SystemExit(f"{out} holds predictions of another external set or run: {done.read_text()}")
        return out / "predictions.csv"
    scoring, model, root = open_external(run_dir, data, external)
    predictions = predict_split(scoring, model, load_baselines(scoring, "the quality benchmark"), "external")
    val = read_split(run_dir, "val_predictions.csv").models
    for name, pred in predictions.items():
        if pred.threshold is None:  # DiffMIC-3D carries its own; the others as the run chose on validation
            pred.threshold = val[name].threshold
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(predictions, scoring.class_names, out / "predictions.csv", root)
    atomic_write_text(done, json.dumps(identity, indent=2) + "\n")  # last: a killed scoring starts again
    return out / "predictions.csv"


def ablate_run(run_dir: Path, data: str, external: Path, out: Path, split) -> dict[str, np.ndarray]:
    """The inference-only ablations of the run's DiffMIC-3D (``utils.benchmarking.ablations.INFERENCE``)
    on the external scans ``split`` holds (``score_run``'s), once: ``out/ablations.npz``, rows in
    ``split``'s scan order (written, read when present, completed when it lacks a variant)."""
    from utils.benchmarking.ablations import INFERENCE, inference_names, inference_variants
    from utils.pipeline import cache_member_guidance
    from utils.training.diffusion import predict_dataset

    cached = out / ABLATIONS
    probs = read_npz(cached) if cached.is_file() else {}
    if all(v in probs for v in INFERENCE):
        return probs
    scoring, model, root = open_external(run_dir, data, external)
    missing = [v for v in inference_names(model) if v not in probs]  # a cache of fewer variants is completed
    if not missing:
        return probs
    dataset, config = scoring.datasets["external"], scoring.config
    if [Path(r.path).relative_to(root).as_posix() for r in dataset.records] != split.paths:
        raise SystemExit(f"{external}: its scans are not those of {out / 'predictions.csv'}")

    def predict(net, guidance, **kw):
        return predict_dataset(net, dataset, guidance, scoring.device, config.batch_size, config.seed,
                               num_workers=config.num_workers, **kw)["probs"].numpy()

    probs.update(inference_variants(model, cache_member_guidance(scoring, model, "external"), predict, missing))
    with atomic_path(cached) as tmp:
        np.savez(tmp, **probs)
    return probs


def ablation_table(runs: dict, variants: dict[int, dict], n_resamples: int) -> str:
    """Markdown: each inference-only variant's mean AUC on the external scans and its pooled
    differences from the full method and from the DCG (fused)."""
    from utils.benchmarking.ablations import INFERENCE
    from utils.evaluation.metrics import classification_metrics
    from utils.evaluation.protocol import hierarchical_paired_auc

    seeds = list(variants)
    labels, paths = [runs[s].labels for s in seeds], [runs[s].paths for s in seeds]

    def pooled(a: list, b: list) -> str:
        h = hierarchical_paired_auc(labels, a, b, n_resamples, 0, paths=paths)
        return f"{h['diff']:+.3f} [{h['ci_low']:+.3f}, {h['ci_high']:+.3f}]"

    full, dcg = ([runs[s].models[m].probs for s in seeds] for m in (OURS, DCG_FUSED))
    rows = ["| variant | mean AUC | minus the full method | minus " + DCG_FUSED + " |", "|---|---:|---:|---:|",
            f"| the full method | {np.mean([classification_metrics(y, p)['roc_auc'] for y, p in zip(labels, full)]):.3f}"
            f" | | {pooled(full, dcg)} |"]
    for variant in (v for v in INFERENCE if all(v in variants[s] for s in seeds)):
        ps = [variants[s][variant] for s in seeds]
        auc = np.mean([classification_metrics(y, p)["roc_auc"] for y, p in zip(labels, ps)])
        rows.append(f"| {variant} | {auc:.3f} | {pooled(ps, full)} | {pooled(ps, dcg)} |")
    return (f"### Inference-only ablations on the external scans (seeds {', '.join(map(str, seeds))}; pooled over "
            "seeds and scans, 95%)\n\nEach seed's finished model changed at test time only, as in the quality "
            "benchmark's `--ablations inference`; read once, for the report, not to choose anything.\n\n"
            + "\n".join(rows) + "\n")


def referral(run_dir: Path, split) -> dict:
    """How ``utils.predict``'s referral, chosen on the run's validation split, works on ``split``
    (the run's DiffMIC-3D on the external scans): the uncertainty score its model file names
    (the margin in files written before it did), its threshold, the share of scans above it
    (referred), the validation share it was chosen to keep, and the accuracy at the decision
    threshold on all, the kept and the referred scans."""
    from utils.paths import MAIN_CHECKPOINT
    from utils.training.checkpoint import load_checkpoint
    from utils.training.readout import FIRST_REFER_SCORE

    saved = load_checkpoint(Path(run_dir) / MAIN_CHECKPOINT)
    threshold = float(saved["model_state_dict"]["refer_threshold"])
    score = str(saved.get("refer_score", FIRST_REFER_SCORE))
    ours = split.models[OURS]
    referred = ours.scores[score] > threshold
    correct = ~errors_of(split.labels, ours.probs, ours.threshold)
    return {"score": score, "threshold": threshold, "coverage": float(saved["train_config"]["refer_coverage"]),
            "referred": float(referred.mean()), "accuracy": float(correct.mean()),
            "kept": float(correct[~referred].mean()) if (~referred).any() else float("nan"),
            "referred_accuracy": float(correct[referred].mean()) if referred.any() else float("nan")}


def referral_table(rows: dict[int, dict]) -> str:
    """Markdown: one row per seed and their mean."""
    keys = ("referred", "accuracy", "kept", "referred_accuracy")
    lines = [f"### Referral (`utils.predict`: {OURS}'s uncertainty, the score its model file names, above the "
             "threshold its run chose on validation)\n",
             "| seed | score | threshold | validation share kept | share referred | accuracy, all | kept | referred |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {r['score']} | {r['threshold']:.3f} | {r['coverage']:.2f} | "
              + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for s, r in rows.items()]
    lines.append("| mean | | | | " + " | ".join(f"{np.nanmean([r[k] for r in rows.values()]):.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def report(runs: dict, name: str, command: str, seeds: tuple[int, ...], n_resamples: int) -> tuple[str, dict, list]:
    """(Markdown, pooled result, goal rows) of the seeds' external predictions."""
    result = analyse(runs, n_resamples)
    goal_rows = goals(name, result)
    n = len(next(iter(runs.values())).labels)
    body = render_results(seeds, result, goal_rows, split="external")
    positives = int(next(iter(runs.values())).labels.sum())
    head = (f"## Quality on {name}: an external test set ({n} new scans, {positives} positive, scored by "
            f"seeds {', '.join(map(str, seeds))})\n\n"
            f"Command: `{command}`. Every seed's finished "
            "models (trained and selected on their own split, as in the quality benchmark) score the same "
            f"{n} scans, none of which any of them saw, each at the decision threshold its run chose on "
            "validation. Nothing is fitted on these scans, and each seed scores them once.\n\n"
            "**Primary comparison, as in the quality benchmark: DiffMIC-3D minus its DCG (fused prediction), "
            "ROC-AUC, pooled over seeds and scans** (bootstrap over seeds and scans, a scan drawn once for all "
            f"the seeds, {n_resamples} resamples; DeLong on the seed-averaged predictions).\n\n")
    return head + body, result, goal_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path, help="folder of finished runs, one per seed")
    parser.add_argument("data", help="phantoms, or the scan folder the runs ran on")
    parser.add_argument("external", type=Path, help="folder of labelled scans none of the runs saw")
    parser.add_argument("--phantoms", type=int, default=None, metavar="N", help="first write N new phantoms there")
    parser.add_argument("--phantom-seed", type=int, default=None, help="their generator seed (not the runs')")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds' runs only (default: all)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "benchmark", help="report folder")
    parser.add_argument("--ablations", action="store_true",
                        help="also the inference-only ablations of every seed's DiffMIC-3D on the external scans")
    parser.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples of every interval")
    args = parser.parse_args(argv)
    if (args.phantoms is None) != (args.phantom_seed is None):
        raise SystemExit("--phantoms and --phantom-seed go together")
    try:
        text = run(args)
    except DataError as exc:  # a bad folder or scan: one line, as utils.run gives it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def run(args: argparse.Namespace) -> str:
    """Score (or read) every seed's runs on the external set and write the report; returns its text."""
    paths = seed_runs(args.runs_dir, args.seeds, args.data)
    if args.phantoms is not None:
        write_phantoms(next(iter(paths.values())), args.data, args.external, args.phantoms, args.phantom_seed)
    if not args.external.is_dir():
        raise SystemExit(f"{args.external} is not a folder of scans")
    tag = args.external.resolve().name
    outs = {s: args.out / "external_runs" / tag / path.name for s, path in paths.items()}  # predictions, ablations
    runs = {s: read_split(score_run(path, args.data, args.external, outs[s]).parent) for s, path in paths.items()}
    name = dataset_setup(args.data)[0] if args.data == "phantoms" else Path(args.data).name
    command = " ".join(["python scripts/external_test.py RUNS_DIR", args.data, args.external.as_posix(),
                        *([] if args.phantoms is None else ["--phantoms", str(args.phantoms),
                                                            "--phantom-seed", str(args.phantom_seed)]),
                        *(["--ablations"] if args.ablations else [])])
    text, result, goal_rows = report(runs, name, command, tuple(paths), args.n_resamples)
    text += "\n" + referral_table({s: referral(path, runs[s]) for s, path in paths.items()})
    if args.ablations:
        variants = {s: ablate_run(path, args.data, args.external, outs[s], runs[s]) for s, path in paths.items()}
        text += "\n" + ablation_table(runs, variants, args.n_resamples)
    stem = f"{name}_external_{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"quality_{stem}.md", text)
    atomic_write_text(args.out / f"quality_{stem}.csv", csv_rows(result, goal_rows))
    write_pooled_figure(runs, result, args.out / f"risk_coverage_{stem}.png", f"{name}, external set")
    return text


if __name__ == "__main__":
    sys.exit(main())
