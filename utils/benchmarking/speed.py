"""Suite section 2: seconds per training epoch of phase 1 and phase 2 on a finished run, and
inference seconds per volume and test accuracy / AUC of each sampler beside a ResNet-18."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.benchmarking.report import RESNET, TARGETS, Report, markdown_table, met_text
from utils.benchmarking.timing import timed
from utils.paths import display_path


def speed(report: Report, run_dir: Path, config, device: torch.device, quick: bool) -> dict:
    """Section 2 on the finished run in ``run_dir`` (trained with ``config``); returns the
    epoch times."""
    from torch.utils.data import DataLoader

    from models.diffmic3d import DiffMIC3D
    from utils.evaluation.metrics import classification_metrics
    from utils.experiment import prepare_experiment
    from utils.predict import load_model
    from utils.training.baselines import baseline_from_checkpoint, build_baseline
    from utils.training.checkpoint import load_checkpoint
    from utils.training.dcg import cache_guidance
    from utils.training.stage import batch_inputs

    exp = prepare_experiment(config, run_dir, device=str(device), verbose=False)
    model, _ = load_model(exp.main_checkpoint, device)
    num_samples = model.config.diffusion.num_samples  # the run's own sampling setting
    train, test = exp.datasets["train"], exp.datasets["test"]
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=False)
    repeats = 2

    # phase 1: real epochs of DCG training (the curriculum at mid-phase) on a fresh model
    torch.manual_seed(0)
    fresh = DiffMIC3D(model.config).to(device)
    opt1 = torch.optim.AdamW(fresh.dcg.parameters(), lr=1e-4)
    curriculum = dict(label_smoothing=config.label_smoothing, progress=0.5, pool_warmup=config.dcg_pool_warmup,
                      local_start=config.dcg_local_start, local_ramp=config.dcg_local_ramp)

    def phase1_epoch():
        fresh.train()
        for batch in loader:
            x, x_hires, y = batch_inputs(batch, device)
            opt1.zero_grad(set_to_none=True)
            fresh.dcg_loss(x, y, x_hires, **curriculum)["loss"].backward()
            opt1.step()

    t1 = timed(phase1_epoch, device, repeats=repeats, warmup=1)

    # phase 2: diffusion_loss on the (augmented) training scans + their cached guidance
    fresh.freeze_dcg()
    guidance = cache_guidance(fresh, exp.datasets["train_plain"], device, config.batch_size, progress=False)

    def phase2_timer(net: DiffMIC3D) -> float:
        opt = torch.optim.AdamW(list(net.prior_generator.parameters()) + list(net.denoiser.parameters()), lr=1e-4)
        gen = torch.Generator(device).manual_seed(0)

        def epoch():
            net.train()
            net.dcg.eval()  # frozen
            for batch in loader:
                x, _, y = batch_inputs(batch, device)
                rows = torch.as_tensor(batch["index"])
                opt.zero_grad(set_to_none=True)
                net.diffusion_loss(x, guidance.index(rows).to(device), y, prior_dropout=config.prior_dropout,
                                   generator=gen)["loss"].backward()
                opt.step()

        return timed(epoch, device, repeats=repeats, warmup=1)

    t2 = phase2_timer(fresh)
    # the same without the denoiser's own image encoder: what phase 2 costs on cached guidance only
    torch.manual_seed(0)
    no_encoder = DiffMIC3D(model.config.with_changes(denoiser={"use_image_encoder": False})).to(device)
    no_encoder.dcg.load_state_dict(fresh.dcg.state_dict())
    no_encoder.freeze_dcg()
    t2_cached = phase2_timer(no_encoder)
    k = config.oof_folds
    oof_epochs = k * (k - 1) / k if k >= 2 else 0.0  # phase-1 epochs of the out-of-fold DCGs per final-DCG epoch
    report.add("speed", f"phase 1 epoch ({len(train)} volumes)", "seconds", t1, unit="s")
    report.add("speed", f"phase 2 epoch ({len(train)} volumes, scans + cached guidance)", "seconds", t2, unit="s")
    report.add("speed", "phase 2 epoch without the own image encoder (cached guidance only)", "seconds", t2_cached,
               unit="s")
    ratio2 = t2 / t1
    report.check(f"phase-2 epoch <= {TARGETS['phase2_over_phase1']} x phase-1 epoch (set when phase 2 ran on cached "
                 "guidance only; phase 2 now also trains its own image encoder on the scans)", ratio2,
                 ratio2 <= TARGETS["phase2_over_phase1"],
                 f"{ratio2:.3f} ({t2:.2f} s / {t1:.2f} s; without the image encoder {t2_cached / t1:.3f})")

    # inference per volume, and what each sampler gives on the test split
    model.eval()
    if exp.checkpoint("resnet18").is_file():
        resnet = baseline_from_checkpoint(load_checkpoint(exp.checkpoint("resnet18")))
    else:  # untrained: same work per forward
        resnet = build_baseline("resnet18", exp.num_classes)
    resnet = resnet.to(device).eval()
    item = test[0]
    x = item["image"][None].to(device)
    x_hires = item["image_hires"][None].to(device) if "image_hires" in item else None
    T = model.config.diffusion.num_timesteps
    samplers = {f"DDPM (all T = {T} steps)": ("ddpm", None), "DDIM 10 steps": ("ddim", 10),
                "DDIM 1 step": ("ddim", 1)}
    test_guidance = cache_guidance(model, test, device, config.batch_size, progress=False)
    y_test = test.labels
    reps = 2 if quick else 5
    rows, per_volume = [], {}
    with torch.no_grad():
        t_resnet = timed(lambda: resnet(x), device, repeats=reps)
        for name, (sampler, steps) in samplers.items():
            gen = torch.Generator(device).manual_seed(0)
            one = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=1, sampler=sampler, steps=steps,
                                              generator=gen),
                        device, repeats=1 if sampler == "ddpm" else reps, warmup=0 if sampler == "ddpm" else 1)
            per_volume[name] = one
            probs = []
            gen = torch.Generator(device).manual_seed(config.seed)
            for batch in DataLoader(test, batch_size=config.batch_size, shuffle=False):
                images, _, _ = batch_inputs(batch, device)
                index = torch.as_tensor(batch["index"])
                probs.append(model.predict(images, test_guidance.index(index).to(device), num_samples=num_samples,
                                           sampler=sampler, steps=steps, generator=gen)["probs"].float().cpu())
            m = classification_metrics(y_test, torch.cat(probs).numpy())
            report.add("speed", name, "seconds per volume (1 sample, DCG + condition included)", one, unit="s")
            report.add("speed", name, "test accuracy", m["accuracy"])
            report.add("speed", name, "test ROC-AUC", m["roc_auc"])
            rows.append([name, f"{one * 1000:.1f}", f"{one / t_resnet:.2f}", f"{m['accuracy']:.3f}",
                         f"{m['roc_auc']:.3f}"])
        gen = torch.Generator(device).manual_seed(0)
        batched = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=num_samples, sampler="ddim",
                                              steps=10, generator=gen), device, repeats=reps)
    report.add("speed", f"DDIM 10 steps, {num_samples} samples batched", "seconds per volume", batched, unit="s")
    rows.append([f"DDIM 10 steps, {num_samples} samples in one batch", f"{batched * 1000:.1f}",
                 f"{batched / t_resnet:.2f}", "", ""])
    report.add("speed", "3D ResNet-18 forward", "seconds per volume", t_resnet, unit="s")
    rows.append(["3D ResNet-18 forward", f"{t_resnet * 1000:.1f}", "1.00", "", ""])
    ratio = per_volume["DDIM 10 steps"] / t_resnet
    report.check(f"DDIM-10 per volume (1 sample, DCG + denoiser encoder included) <= {TARGETS['ddim10_over_resnet']} "
                 f"x {RESNET} forward", ratio, ratio <= TARGETS["ddim10_over_resnet"],
                 f"{ratio:.2f}x ({per_volume['DDIM 10 steps'] * 1000:.1f} ms vs {t_resnet * 1000:.1f} ms)")
    report.text(f"## 2. Speed (`{config.profile}` profile, input {config.input_shape}, model `{config.model_preset}`, "
                f"batch {config.batch_size}; run `{display_path(run_dir)}`)\n\n"
                f"Training steps only (median of {repeats} epochs after one untimed; validation passes excluded), "
                f"{len(train)} training volumes with the train-time flips:\n\n"
                + markdown_table(["phase", "s / epoch", "x phase 1"], [
                    ["phase 1 (DCG, `dcg_loss`)", f"{t1:.2f}", "1.00"],
                    ["phase 2 (`diffusion_loss` on scans + cached guidance)", f"{t2:.2f}", f"{ratio2:.3f}"],
                    ["phase 2 without the own image encoder (cached guidance only)", f"{t2_cached:.2f}",
                     f"{t2_cached / t1:.3f}"]]) +
                f"\n\nPhase 2 now runs the denoiser's own image encoder over every training scan each step, so its "
                f"epoch is no longer a small fraction of phase 1's: {ratio2:.3f} x (target <= "
                f"{TARGETS['phase2_over_phase1']}, set for the cached-guidance-only design: "
                f"{met_text(ratio2 <= TARGETS['phase2_over_phase1'])}). "
                f"Before phase 2, {k} out-of-fold DCGs (`oof_folds`) each train on {k - 1}/{k} of the split: about "
                f"{oof_epochs:.1f} phase-1 epochs per epoch of the final DCG.\n\n"
                "Inference per volume (batch 1, one sample, the DCG and the condition (own image encoder + U-Net) once "
                "per call, the per-point head once per step), and the test-split accuracy / AUC of each sampler with "
                f"the run's {num_samples} samples ({len(y_test)} scans, seed-{config.seed} model, cached test "
                "guidance):\n\n"
                + markdown_table(["sampler", "ms / volume", "x ResNet-18", "accuracy", "ROC-AUC"], rows) +
                f"\n\nDDIM 10 vs a ResNet-18 forward: {ratio:.2f}x (target <= {TARGETS['ddim10_over_resnet']}: "
                f"{met_text(ratio <= TARGETS['ddim10_over_resnet'])}).")
    return {"phase1_epoch": t1, "phase2_epoch": t2, "phase2_cached_epoch": t2_cached}
