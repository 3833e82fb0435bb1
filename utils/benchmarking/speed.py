"""Suite section 2: seconds per training epoch of phase 1 and phase 2 on a finished run;
inference per volume split into its parts (DCG members, condition branch, sampling) beside one
DCG forward and a ResNet-18 forward, how it grows with chains and steps, and the test accuracy
/ AUC of each sampler."""
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
    from utils.pipeline import cache_member_guidance
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

    # inference per volume: its parts, how it grows, and what each sampler gives on the test split
    model.eval()
    if exp.checkpoint("resnet18").is_file():
        resnet = baseline_from_checkpoint(load_checkpoint(exp.checkpoint("resnet18")))
    else:  # untrained: same work per forward
        resnet = build_baseline("resnet18", exp.num_classes)
    resnet = resnet.to(device).eval()
    item = test[0]
    x = item["image"][None].to(device)
    x_hires = item["image_hires"][None].to(device) if "image_hires" in item else None
    reps = 2 if quick else 5
    parts = inference_parts(model, resnet, x, x_hires, device, reps, num_samples, DDIM_STEPS)
    growth = inference_growth(model, x, x_hires, device, reps, num_samples, DDIM_STEPS, quick)
    for name, seconds in parts.items():
        report.add("speed", f"inference: {name}", "seconds per volume", seconds, unit="s")
    total, dcg, t_resnet = parts["DiffMIC-3D predict"], parts["one DCG forward"], parts["3D ResNet-18 forward"]
    report.check(f"DiffMIC-3D inference ({num_samples} chains x {DDIM_STEPS} DDIM steps, batch 1) <= "
                 f"{TARGETS['inference_over_dcg']} x one DCG forward", total / dcg,
                 total / dcg <= TARGETS["inference_over_dcg"],
                 f"{total / dcg:.2f}x ({total * 1000:.1f} ms vs {dcg * 1000:.1f} ms)")
    report.check(f"DiffMIC-3D inference ({num_samples} chains x {DDIM_STEPS} DDIM steps, batch 1) <= "
                 f"{TARGETS['inference_over_resnet']} x a {RESNET} forward", total / t_resnet,
                 total / t_resnet <= TARGETS["inference_over_resnet"],
                 f"{total / t_resnet:.2f}x ({total * 1000:.1f} ms vs {t_resnet * 1000:.1f} ms)")
    part_rows = [[name, f"{sec * 1000:.1f}", f"{sec / dcg:.2f}", f"{sec / t_resnet:.2f}"] for name, sec in parts.items()]

    T = model.config.diffusion.num_timesteps
    samplers = {f"DDPM (all T = {T} steps)": ("ddpm", None), f"DDIM {DDIM_STEPS} steps": ("ddim", DDIM_STEPS),
                "DDIM 1 step": ("ddim", 1)}
    test_guidance = cache_member_guidance(exp, model, "test")
    y_test = test.labels
    rows = []
    with torch.inference_mode():
        for name, (sampler, steps) in samplers.items():
            one = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=num_samples, sampler=sampler,
                                              steps=steps, generator=torch.Generator(device).manual_seed(0)),
                        device, repeats=1 if sampler == "ddpm" else reps, warmup=0 if sampler == "ddpm" else 1)
            probs = []
            gen = torch.Generator(device).manual_seed(config.seed)
            for batch in DataLoader(test, batch_size=config.batch_size, shuffle=False):
                images, _, _ = batch_inputs(batch, device)
                index = torch.as_tensor(batch["index"])
                probs.append(model.predict(images, [g.index(index).to(device) for g in test_guidance],
                                           num_samples=num_samples, sampler=sampler, steps=steps,
                                           generator=gen)["probs"].float().cpu())
            m = classification_metrics(y_test, torch.cat(probs).numpy())
            report.add("speed", name, f"seconds per volume ({num_samples} chains, DCGs + condition included)", one,
                       unit="s")
            report.add("speed", name, "test accuracy", m["accuracy"])
            report.add("speed", name, "test ROC-AUC", m["roc_auc"])
            rows.append([name, f"{one * 1000:.1f}", f"{one / t_resnet:.2f}", f"{m['accuracy']:.3f}",
                         f"{m['roc_auc']:.3f}"])
    main_job = main_job_time(report, run_dir)
    m_members = model.num_members
    report.text(f"## 2. Speed (`{config.profile}` profile, input {config.input_shape}, model `{config.model_preset}`, "
                f"batch {config.batch_size}; run `{display_path(run_dir)}`)\n\n"
                f"Training steps only (median of {repeats} epochs after one untimed; validation passes excluded), "
                f"{len(train)} training volumes with the train-time flips:\n\n"
                + markdown_table(["phase", "s / epoch", "x phase 1"], [
                    ["phase 1 (DCG, `dcg_loss`)", f"{t1:.2f}", "1.00"],
                    ["phase 2 (`diffusion_loss` on scans + cached guidance)", f"{t2:.2f}", f"{ratio2:.3f}"],
                    ["phase 2 without the own image encoder (cached guidance only)", f"{t2_cached:.2f}",
                     f"{t2_cached / t1:.3f}"]]) +
                f"\n\nPhase 2 runs the denoiser's own image encoder over every training scan each step, so its "
                f"epoch is not a small fraction of phase 1's: {ratio2:.3f} x (target <= "
                f"{TARGETS['phase2_over_phase1']}, set for the cached-guidance-only design: "
                f"{met_text(ratio2 <= TARGETS['phase2_over_phase1'])}). "
                f"Before phase 2, {k} out-of-fold DCGs (`oof_folds`) each train on {k - 1}/{k} of the split: about "
                f"{oof_epochs:.1f} phase-1 epochs per epoch of the final DCG.\n\n"
                f"**Inference, one volume** (batch 1, `torch.inference_mode`, median of {reps} calls after one "
                f"untimed). `predict` runs the {m_members} DCG members (the final DCG and the out-of-fold ones the "
                f"chains are spread over), then the condition branch once per scan (own image encoder once, priors "
                f"and condition U-Net for all members as one batch), then the per-point head once per DDIM step over "
                f"all {num_samples} chains as one batch:\n\n"
                + markdown_table(["part", "ms / volume", "x one DCG", "x ResNet-18"], part_rows) +
                f"\n\nDiffMIC-3D vs one DCG forward: **{total / dcg:.2f}x** (goal <= {TARGETS['inference_over_dcg']}: "
                f"{met_text(total / dcg <= TARGETS['inference_over_dcg'])}); vs a ResNet-18 forward: "
                f"**{total / t_resnet:.2f}x** (goal <= {TARGETS['inference_over_resnet']}: "
                f"{met_text(total / t_resnet <= TARGETS['inference_over_resnet'])}). The DCG members are "
                f"{parts['all DCG members'] / total:.0%} of the total, sampling "
                f"{parts['sampling (chains x steps)'] / total:.0%}.\n\n"
                "How the whole call grows with the chains (at "
                f"{DDIM_STEPS} DDIM steps) and with the steps (at {num_samples} chains):\n\n"
                + markdown_table(["chains", "steps", "ms / volume", "sampling ms"], growth) +
                f"\n\nEach sampler on the test split ({len(y_test)} scans, seed-{config.seed} model, the run's "
                f"{num_samples} chains, cached member guidance; time per volume at batch 1 with the DCGs):\n\n"
                + markdown_table(["sampler", "ms / volume", "x ResNet-18", "accuracy", "ROC-AUC"], rows)
                + "\n\n" + main_job)
    return {"phase1_epoch": t1, "phase2_epoch": t2, "phase2_cached_epoch": t2_cached, **parts}


DDIM_STEPS = 10


def main_job_time(report: Report, run_dir: Path) -> str:
    """The main job's wall time from ``run_dir/main_job_timings.json`` (written by
    ``utils.run_notebooks`` when it ran all seven notebooks there) against the goal; a
    paragraph for the report."""
    import json

    from utils.paths import MAIN_JOB_TIMINGS_JSON

    path = Path(run_dir) / MAIN_JOB_TIMINGS_JSON
    goal = TARGETS["main_job_minutes"]
    name = f"`{'demo'}` main job (`bash run.sh`: phantoms when absent + notebooks 01-07) <= {goal:g} min after set-up"
    if not path.is_file():
        report.target(name, "not measured", f"the speed run `{display_path(run_dir)}` was not made by "
                                            "`utils.run_notebooks` (no main_job_timings.json)")
        return "**Main job**: not measured (the speed run was not a notebook run)."
    timings = json.loads(path.read_text())
    stages = {k: v for k, v in timings.items() if isinstance(v, (int, float)) and k != "total"}
    minutes = timings["total"] / 60
    report.check(name, minutes, minutes <= goal, f"{minutes:.1f} min")
    for stage, seconds in stages.items():
        report.add("main job", stage, "seconds", seconds, unit="s")
    note = f"; {timings['note']}" if "note" in timings else ""
    return (f"**Main job** (`{timings.get('runner')}`, profile `{timings.get('profile')}`, in `{display_path(run_dir)}`"
            f"{note}): **{minutes:.1f} min** (goal <= {goal:g}: {met_text(minutes <= goal)}).\n\n"
            + markdown_table(["stage", "s"], [[k, f"{v:.0f}"] for k, v in stages.items()]))


def inference_parts(model, resnet, x: torch.Tensor, x_hires, device: torch.device, reps: int, chains: int,
                    steps: int) -> dict[str, float]:
    """Seconds per volume of each part of ``model.predict(x)`` (batch 1), the whole call and a
    ResNet-18 forward, each timed on its own (median of ``reps``)."""
    S = model.chains(chains)
    with torch.inference_mode():
        members = model.member_guidance(x, x_hires)
        M_rep, cond_rep, _ = model.chain_conditions(x, members, S)
        sample = dict(steps=steps, sampler="ddim")
        return {
            "one DCG forward": timed(lambda: model.dcg(x, x_hires), device, repeats=reps),
            "all DCG members": timed(lambda: model.member_guidance(x, x_hires), device, repeats=reps),
            "condition branch (encoder, priors, U-Net)": timed(lambda: model.chain_conditions(x, members, S), device,
                                                               repeats=reps),
            "sampling (chains x steps)": timed(lambda: model.run_chains(
                M_rep, cond_rep, generator=torch.Generator(device).manual_seed(0), **sample), device, repeats=reps),
            "DiffMIC-3D predict": timed(lambda: model.predict(
                x, x_hires=x_hires, num_samples=chains, generator=torch.Generator(device).manual_seed(0), **sample),
                device, repeats=reps),
            "3D ResNet-18 forward": timed(lambda: resnet(x), device, repeats=reps),
        }


def inference_growth(model, x: torch.Tensor, x_hires, device: torch.device, reps: int, chains: int, steps: int,
                     quick: bool) -> list[list[str]]:
    """Rows (chains, steps, ms of the whole call, ms of the sampling part) for several chain
    counts at ``steps`` and several step counts at ``chains``."""
    m = model.num_members
    chain_counts = sorted({m, model.chains(chains // 4 or 1), model.chains(chains), model.chains(2 * chains)})
    step_counts = [1, steps] if quick else [1, 5, steps, 2 * steps]
    grid = [(c, steps) for c in chain_counts] + [(model.chains(chains), n) for n in step_counts if n != steps]
    rows = []
    with torch.inference_mode():
        members = model.member_guidance(x, x_hires)
        for c, n in grid:
            M_rep, cond_rep, _ = model.chain_conditions(x, members, c)
            whole = timed(lambda: model.predict(x, x_hires=x_hires, num_samples=c, sampler="ddim", steps=n,
                                                generator=torch.Generator(device).manual_seed(0)), device, repeats=reps)
            sampling = timed(lambda: model.run_chains(M_rep, cond_rep, steps=n, sampler="ddim",
                                                      generator=torch.Generator(device).manual_seed(0)),
                             device, repeats=reps)
            rows.append([str(c), str(n), f"{whole * 1000:.1f}", f"{sampling * 1000:.1f}"])
    return rows
