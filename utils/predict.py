"""Classify new CT scans with a trained DiffMIC-3D checkpoint: a function and a CLI.

    python -m utils.predict SCAN [SCAN ...] [--output-dir DIR | --checkpoint FILE]
                            [--samples N] [--seed 0] [--json] [--device cpu|cuda] [--allow-non-hu]

The model is ``OUTPUT_DIR/diffmic3d_enhanced_model.pth`` of the run folder, found as the notebooks
find theirs (``utils.paths.default_output_dir``: ``--output-dir``; else ``$MEDISCOPE_OUTPUT_DIR``;
else ``/kaggle/working/outputs`` on Kaggle; else ``outputs/`` in the repository, whatever the
current directory), or the file ``--checkpoint`` names.

SCAN is a ``.nii`` / ``.nii.gz`` file, a folder holding one DICOM series, or a folder of
``.nii`` / ``.nii.gz`` files (each is predicted). Every scan goes through exactly the
training pipeline: ``utils.data.nifti_io.load_scan`` (HU, RAS+, voxel spacing) then
``utils.data.preprocessing.preprocess`` with the checkpoint's own ``preprocess_config`` (and its
``hires_preprocess_config`` for a model with ``roi_scale > 1``), read with
``PreprocessConfig.from_dict``. A checkpoint whose preprocessing predates anti-aliasing /
``target_spacing`` (no such keys) is refused ("trained by an older version, retrain"), and so
is a model trained on MedMNIST (``data_source.kind == 'medmnist'``): it never saw HU. For each scan the CLI prints the predicted class, its
probability and two uncertainties: the standard deviation of that probability over the
diffusion model's stochastic samples (its chains, spread over the model's prior members) and
the predictive entropy ``-sum_c p_c ln p_c`` of the mean probabilities (nats; ln C at complete
indecision). The class is decided at the model's validation-chosen threshold (binary), and a
scan whose uncertainty is above the referral threshold chosen on the validation split is
marked ``REFER`` (``refer: true`` in the JSON): it should be read by a human.
``--json`` prints a JSON list of the same records instead.

A bad scan gives the loader's one-line ``DataError`` on stderr; the other scans are still
predicted and the exit status is 1. A missing or foreign checkpoint is a one-line error too,
and so is a stage checkpoint (``checkpoints/dcg.pth``, ``diffusion.pth``): only a finished
model file is accepted. A scan whose values are not Hounsfield units (no air: an 8-bit or
normalised image, stored values without the rescale) is refused with the reason unless
``--allow-non-hu`` is given; then, and whenever the scan's DCG features lie far from the
training scans' (``utils.evaluation.ood``), the result is marked out-of-distribution in the text and in
the JSON (``out_of_distribution``, ``ood_reasons``, ``feature_distance``).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.diffmic3d import DiffMIC3D
from utils.training.checkpoint import check_config_matches, load_checkpoint
from utils.cli import make_parser
from utils.errors import DataError
from utils.data.nifti_io import CTVolume, HUWarning, hu_problem, load_scan
from utils.evaluation.ood import feature_distance
from utils.paths import MAIN_CHECKPOINT, default_output_dir, display_path
from utils.data.preprocessing import PreprocessConfig, preprocess
from utils.seeding import pick_device
from utils.training.readout import FIRST_REFER_SCORE, REFER_SCORE, REFER_SCORES, diffmic_uncertainty

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about how to use its model.

    Attributes:
        checkpoint: the file it came from.
        class_names: (C,) class names, index = label.
        label_mode: ``'binary'`` or ``'severity'``.
        preprocess: preprocessing of the network input (target_shape = the model's input).
        hires_preprocess: preprocessing of the high-resolution copy (``roi_scale > 1``), else None.
        feature_stats: the training scans' DCG feature statistics (``utils.evaluation.ood``), or None.
        training_data: what the model was trained on, in words (for the research-use note).
        refer_score: the uncertainty score its referral threshold is on
            (``utils.training.readout.diffmic_uncertainty``; the margin in files written before it).
    """

    checkpoint: Path
    class_names: tuple[str, ...]
    label_mode: str
    preprocess: PreprocessConfig
    hires_preprocess: PreprocessConfig | None
    feature_stats: dict | None = None
    training_data: str = "unknown data"
    refer_score: str = REFER_SCORE

    @property
    def note(self) -> str:
        """The one-line research-use note printed with every prediction."""
        return (f"Research use only, not for diagnosis: this model was trained on {self.training_data} "
                f"({self.checkpoint.name}).")


PREPROCESS_KEYS_SINCE_ANTI_ALIAS = ("anti_alias", "target_spacing")


def _preprocess_config(path: Path, ckpt: dict, key: str) -> PreprocessConfig | None:
    """The checkpoint's ``key`` entry as a PreprocessConfig (None if absent or None).

    A checkpoint written before anti-aliased resampling and ``target_spacing`` existed lacks
    those keys; its model saw aliased inputs, so it is refused rather than silently fed
    differently preprocessed scans.
    """
    data = ckpt.get(key)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise DataError(path, f"invalid {key} (not a mapping)")
    missing = [k for k in PREPROCESS_KEYS_SINCE_ANTI_ALIAS if k not in data]
    if missing:
        raise DataError(path, f"{key} has no {' / '.join(missing)}: trained by an older version, retrain "
                              "with `python -m utils.run`")
    try:
        return PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise DataError(path, f"invalid {key} ({err})") from err


def _state_dict_mismatch(model: torch.nn.Module, state: dict) -> str | None:
    """A one-line description of how ``state`` differs from ``model``'s parameters, or None."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in
             (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped)) if items]
    return "model_state_dict does not match its model_config (weights of another configuration?): " + "; ".join(parts)


def load_model(checkpoint_path: str | Path, device: torch.device | str = "cpu") -> tuple[DiffMIC3D, CheckpointMeta]:
    """Load a DiffMIC-3D checkpoint written by ``python -m utils.run`` (``weights_only=True``).

    Returns:
        the model in eval mode on ``device``, and its :class:`CheckpointMeta`.

    Raises:
        DataError: one line naming the file: missing (run ``python -m utils.run`` first),
            unreadable, not a MediScope checkpoint, not a DiffMIC-3D one (e.g. a baseline),
            trained on MedMNIST, a stage checkpoint or anything but a finished model file,
            weights not matching the stored config, preprocessing of an older version, or
            inconsistent preprocessing.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found; train a model first with `python -m utils.run` "
                              "or pass --checkpoint PATH")
    ckpt = load_checkpoint(path, map_location="cpu")
    model_config = ckpt["model_config"]
    if "name" in model_config:
        raise DataError(path, f"holds a {model_config['name']} baseline, not a DiffMIC-3D model")
    source = ckpt.get("data_source")
    if isinstance(source, dict) and source.get("kind") == "medmnist":
        raise DataError(path, f"was trained on MedMNIST ({source.get('name', '?')}: 8-bit volumes, no HU "
                              "preprocessing); a MedMNIST model cannot read a CT file")
    try:
        model = DiffMIC3D.from_config_dict(model_config)
    except (TypeError, ValueError) as err:
        if " lacks " in str(err):  # a field added since: a model of an older version
            raise DataError(path, f"written by an older version of the model ({err}); retrain it") from err
        raise DataError(path, f"model_config is not a DiffMIC-3D configuration ({err})") from err
    if "fit" in ckpt:
        stage = ckpt["fit"].get("name", "?") if isinstance(ckpt["fit"], dict) else "?"
        raise DataError(path, f"is the training checkpoint of the '{stage}' stage, not a finished model "
                              f"({'a DCG only: its denoiser is untrained' if stage == 'dcg' else 'uncalibrated'}); "
                              "pass the run's diffmic3d_enhanced_model.pth")
    if "history" not in ckpt:
        raise DataError(path, "not a finished model file (written by `python -m utils.run` as "
                              "diffmic3d_enhanced_model.pth)")
    config = model.config
    try:
        check_config_matches(model_config, config.to_dict())  # a field added since: an older model
    except ValueError as err:
        raise DataError(path, f"written by an older version of the model ({err}); retrain it") from err
    mismatch = _state_dict_mismatch(model, ckpt["model_state_dict"])
    if mismatch:
        raise DataError(path, mismatch)
    model.load_state_dict(ckpt["model_state_dict"])

    for key in ("preprocess_config", "class_names"):
        if key not in ckpt:
            raise DataError(path, f"checkpoint has no {key}; it was not written by `python -m utils.run`")
    prep = _preprocess_config(path, ckpt, "preprocess_config")
    hires = _preprocess_config(path, ckpt, "hires_preprocess_config")
    dcg = config.dcg
    if prep.target_shape != tuple(dcg.input_shape):
        raise DataError(path, f"preprocess_config target_shape {prep.target_shape} != model input "
                              f"{tuple(dcg.input_shape)}")
    if dcg.roi_scale > 1 and (hires is None or hires.target_shape != dcg.crop_source_shape):
        raise DataError(path, f"roi_scale {dcg.roi_scale} needs hires_preprocess_config with target_shape "
                              f"{dcg.crop_source_shape}, got {None if hires is None else hires.target_shape}")
    refer_score = str(ckpt.get("refer_score", FIRST_REFER_SCORE))
    if refer_score not in REFER_SCORES:
        raise DataError(path, f"refer_score {refer_score!r} is none of {REFER_SCORES}")
    class_names = tuple(str(c) for c in ckpt["class_names"])
    if len(class_names) != config.num_classes:
        raise DataError(path, f"{len(class_names)} class_names for a model with {config.num_classes} classes")
    meta = CheckpointMeta(checkpoint=path, class_names=class_names, label_mode=str(ckpt.get("label_mode", "binary")),
                          preprocess=prep, hires_preprocess=hires if dcg.roi_scale > 1 else None,
                          feature_stats=ckpt.get("feature_stats"),
                          training_data=_training_data(source), refer_score=refer_score)
    return model.to(device).eval(), meta


def _training_data(source) -> str:
    """``data_source`` of a checkpoint in words: synthetic phantoms, or the dataset folder's name."""
    if not isinstance(source, dict):
        return "unknown data (the checkpoint does not say)"
    if source.get("synthetic"):
        return f"synthetic chest-CT phantoms ({source.get('n_scans', '?')} scans), not real patients"
    return f"the dataset folder '{Path(str(source.get('root', '?'))).name}' ({source.get('n_scans', '?')} scans)"


def _input_tensor(volume: CTVolume, config: PreprocessConfig, device: torch.device | str) -> torch.Tensor:
    """(1, 1, H, W, D) float32 network input from a loaded scan (its voxel spacing is
    used when the config has a ``target_spacing``), exactly as ``utils.data.cache`` does it."""
    return torch.from_numpy(preprocess(volume.hu, config, spacing=volume.spacing))[None].to(device)


def predict_scan(model: DiffMIC3D, meta: CheckpointMeta, path: str | Path, device: torch.device | str = "cpu",
                 num_samples: int | None = None, seed: int = 0, allow_non_hu: bool = False) -> dict:
    """Classify one scan (NIfTI file or DICOM series folder).

    Args:
        model, meta: from :func:`load_model`.
        path: the scan.
        device: where the model lives.
        num_samples: stochastic diffusion samples (default: the model's ``DiffusionConfig.num_samples``).
        seed: seed of the CPU generator drawing the sampling noise; the result of a scan
            depends only on it, not on the other scans predicted alongside.
        allow_non_hu: predict a scan whose values are not Hounsfield units (refused by
            default), marking it out-of-distribution.

    Returns:
        ``{"path": str, "predicted_class": name, "probability": p of that class,
        "probs": {name: p}, "std": {name: std over samples}, "entropy": nats,
        "decision_threshold": the validation-chosen threshold on p(class 1) the class was decided at
        (binary; None otherwise), "uncertainty": the model's referral score
        (``utils.training.readout.diffmic_uncertainty``), "refer_score": its name, "refer_threshold",
        "refer": whether the uncertainty is above the threshold chosen on the validation split (a
        human should read this scan), "out_of_distribution": bool, "ood_reasons": [str], "feature_distance": float or None,
        "feature_threshold": float or None}``: out-of-distribution when the scan is not in
        HU (with ``allow_non_hu``) or its DCG features are far from the training scans'
        (``utils.evaluation.ood``; None for a model file without training statistics).

    Raises:
        DataError: the scan cannot be loaded (the loader's one-line message), or is not in
            Hounsfield units and ``allow_non_hu`` is False.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HUWarning)  # reported in the result instead
        volume = load_scan(path, allow_non_hu=allow_non_hu)
    problem = hu_problem(volume.hu) if allow_non_hu else None  # otherwise the loader has refused it already
    reasons = [f"not Hounsfield units: {problem}"] if problem else []
    x = _input_tensor(volume, meta.preprocess, device)
    x_hires = _input_tensor(volume, meta.hires_preprocess, device) if meta.hires_preprocess else None
    generator = torch.Generator().manual_seed(seed)
    members = model.member_guidance(x, x_hires)  # the final DCG first, then the out-of-fold ones
    guidance = members[0]
    out = model.predict(x, guidance=members, num_samples=num_samples, generator=generator)
    distance = None
    if meta.feature_stats is not None:
        distance = float(feature_distance(meta.feature_stats, guidance.global_features.float())[0])
        if distance > meta.feature_stats["threshold"]:
            reasons.append(f"unlike the training scans (feature distance {distance:.2f} > "
                           f"{meta.feature_stats['threshold']:.2f})")
    probs = out["probs"][0].double().cpu().numpy()  # (C,)
    std = out["std"][0].double().cpu().numpy()  # (C,)
    top = int(model.decide(out["probs"][:1])[0])  # at the validation-chosen threshold (binary)
    threshold = float(model.decision_threshold)
    uncertainty = float(diffmic_uncertainty({k: out[k].cpu() for k in ("probs", "samples")}, threshold,
                                            meta.refer_score)[0])
    refer_at = float(model.refer_threshold)
    names = meta.class_names
    return {
        "path": str(path),
        "predicted_class": names[top],
        "probability": float(probs[top]),
        "probs": {name: float(p) for name, p in zip(names, probs)},
        "std": {name: float(s) for name, s in zip(names, std)},
        "entropy": float(out["entropy"][0]),
        "decision_threshold": threshold if len(names) == 2 else None,
        "uncertainty": uncertainty,
        "refer_score": meta.refer_score,
        "refer_threshold": refer_at,
        "refer": bool(uncertainty > refer_at),
        "out_of_distribution": bool(reasons),
        "ood_reasons": reasons,
        "feature_distance": distance,
        "feature_threshold": None if meta.feature_stats is None else float(meta.feature_stats["threshold"]),
        "note": meta.note,
    }


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Scans to predict from the command line's SCAN arguments.

    A folder holding ``.nii`` / ``.nii.gz`` files stands for those files (sorted; other
    visible entries are reported, not predicted); any other folder is a DICOM series; a file
    (or a path that does not exist, which the loader then reports) stands for itself.

    Returns:
        (scans, notes): the paths to predict and one line per skipped entry.
    """
    scans, notes = [], []
    for item in map(Path, inputs):
        if not item.is_dir():
            scans.append(item)
            continue
        entries = sorted(p for p in item.iterdir() if not p.name.startswith("."))
        nifti = [p for p in entries if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)]
        if not nifti:
            scans.append(item)  # a DICOM series folder
            continue
        scans.extend(nifti)
        notes.extend(f"{p}: skipped (not a .nii / .nii.gz file)" for p in entries if p not in nifti)
    return scans, notes


def format_result(result: dict) -> str:
    """One human-readable line per scan."""
    name = result["predicted_class"]
    others = ", ".join(f"{c} {p:.3f}" for c, p in result["probs"].items())
    flag = (f"; OUT OF DISTRIBUTION: {'; '.join(result['ood_reasons'])}, do not trust this prediction"
            if result.get("out_of_distribution") else "")
    refer = "; REFER: uncertain, above the validation-chosen threshold" if result.get("refer") else ""
    return (f"{result['path']}: {name} (probability {result['probability']:.3f}; uncertainty: "
            f"std {result['std'][name]:.3f}, entropy {result['entropy']:.3f} nats) [{others}]{refer}{flag}")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("utils.predict", "Classify CT scans with a trained DiffMIC-3D checkpoint: predicted class, "
                                          "its probability, and its uncertainty (std over diffusion samples, "
                                          "predictive entropy in nats). For research use, not for diagnosis.")
    parser.add_argument("scans", nargs="+", metavar="SCAN",
                        help=".nii/.nii.gz file, DICOM series folder, or folder of .nii/.nii.gz files")
    parser.add_argument("--output-dir", type=Path, default=default_output_dir(),
                        help=f"the run folder whose {MAIN_CHECKPOINT} to use (default: $MEDISCOPE_OUTPUT_DIR, "
                             "/kaggle/working/outputs on Kaggle, else outputs in the repository)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"a finished model file, instead of the run folder's (default: OUTPUT_DIR/{MAIN_CHECKPOINT})")
    parser.add_argument("--samples", type=int, default=None,
                        help="stochastic diffusion samples per scan (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results instead of text")
    parser.add_argument("--allow-non-hu", action="store_true",
                        help="predict scans whose values are not Hounsfield units (refused by default), "
                             "marked out-of-distribution")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N (default: $MEDISCOPE_DEVICE, else CUDA if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0: every scan predicted, 1: some error)."""
    args = build_parser().parse_args(argv)
    if args.samples is not None and args.samples < 1:
        print(f"error: --samples must be at least 1, got {args.samples}", file=sys.stderr)
        return 1
    try:
        device = pick_device(args.device)
    except ValueError as err:
        print(f"error: --device: {err}", file=sys.stderr)
        return 1
    checkpoint = args.checkpoint or args.output_dir / MAIN_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        print(f"error: no trained model in the run folder {display_path(args.output_dir)} (no {MAIN_CHECKPOINT}); "
              "train one with `python -m utils.run`, or choose another run with --output-dir DIR "
              "(or $MEDISCOPE_OUTPUT_DIR) or a model file with --checkpoint FILE", file=sys.stderr)
        return 1
    try:
        model, meta = load_model(checkpoint, device)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(meta.note, file=sys.stderr)
    scans, notes = expand_inputs(args.scans)
    for note in notes:
        print(note, file=sys.stderr)
    results, failed = [], 0
    for scan in scans:
        try:
            result = predict_scan(model, meta, scan, device, args.samples, args.seed, args.allow_non_hu)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        results.append(result)
        if not args.json:
            print(format_result(result), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
