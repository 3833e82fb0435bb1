"""Profiles: the three named configs, overrides, validation, plain-data round trip."""
import json

import pytest

from models.diffmic3d import DiffMIC3D
from utils.overrides import describe, field_types
from utils.training.profiles import LIMITS, PROFILES, TrainConfig, get_profile, model_settings, parse_overrides


def test_full_profile_is_the_seed_configuration():
    full = get_profile("full")
    assert full.input_shape == (128, 128, 64) and full.batch_size == 4
    assert (full.dcg_epochs, full.diffusion_epochs, full.patience) == (15, 30, 7)
    assert (full.lr_dcg, full.weight_decay, full.label_smoothing, full.grad_clip) == (1e-3, 0.01, 0.1, 1.0)
    config = full.model_config("cpu")
    assert config.dcg.input_shape == (128, 128, 64) and config.grid_size == 8 and config.dcg.num_rois == 5


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_builds_its_model_and_round_trips(name):
    profile = get_profile(name)
    assert TrainConfig.from_dict(profile.to_dict()) == profile
    config = profile.model_config("cpu")
    assert config.dcg.input_shape == profile.input_shape
    sampling = profile.model_overrides["diffusion"]  # the profile's sampling settings live in the model config
    assert (config.diffusion.num_samples, config.diffusion.ddim_steps) == (sampling["num_samples"], sampling["ddim_steps"])
    if name == "smoke":
        assert sum(p.numel() for p in DiffMIC3D(config).parameters()) < 1_000_000


def test_overrides_apply_and_parse_from_strings():
    overrides = parse_overrides(["batch_size=2", "input_shape=48,48,32", "amp=auto", "lr_dcg=5e-4",
                                 "label_mode=severity", "baselines=resnet18", "grad_clip=none"])
    profile = get_profile("demo", **overrides)
    assert profile.batch_size == 2 and profile.input_shape == (48, 48, 32) and profile.amp is None
    assert profile.lr_dcg == 5e-4 and profile.num_classes == 5 and profile.baselines == ("resnet18",)
    assert profile.grad_clip is None and profile.dcg_epochs == PROFILES["demo"].dcg_epochs


def test_model_settings_merge_over_the_profiles_by_section():
    profile = get_profile("smoke", **parse_overrides(["diffusion.num_samples=3", "dcg.top_t=0.5"]))
    assert profile.model_overrides == {"diffusion": {"num_samples": 3, "ddim_steps": 2}, "dcg": {"top_t": 0.5}}
    config = profile.model_config("cpu")
    assert (config.diffusion.num_samples, config.diffusion.ddim_steps, config.dcg.top_t) == (3, 2, 0.5)
    merged = get_profile("smoke", model_overrides={"diffusion": {"eta": 0.5}})
    assert merged.model_overrides["diffusion"] == {"num_samples": 2, "ddim_steps": 2, "eta": 0.5}


@pytest.mark.parametrize("call, message", [
    (lambda: get_profile("huge"), "unknown profile"),
    (lambda: get_profile("demo", **{"diffusion.num_steps": 3}), r"diffusion has no settable fields \['num_steps'\]"),
    (lambda: get_profile("demo", **{"diffusion.ddim_steps": 0}), "ddim_steps must be in"),
    (lambda: get_profile("demo", **{"prior.num_rois": 3}), r"prior has no settable fields \['num_rois'\]"),
    (lambda: get_profile("demo", **{"priors.blend": "fitted"}), "unknown sections"),
    (lambda: get_profile("demo", epochs=3), "unknown TrainConfig field"),
    (lambda: get_profile("demo", input_shape=(60, 64, 32)), "input_shape=.*multiple of 16"),
    (lambda: get_profile("demo", n_resamples=100), "n_resamples"),
    (lambda: get_profile("demo", baselines=("vgg",)), "baselines"),
    (lambda: get_profile("demo", batch_size=0), "batch_size"),
    (lambda: parse_overrides(["batch_size"]), "KEY=VALUE"),
    (lambda: get_profile("demo", error_weighting="labels"), "error_weighting"),
])
def test_invalid_settings_are_refused_with_the_field_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": "abc"}, "batch_size='abc': expected a positive integer"),
    ({"dcg_epochs": 1.5}, "dcg_epochs=1.5: expected an integer >= 0"),
    ({"amp": "maybe"}, "amp='maybe': expected one of true, false, auto"),
    ({"lr_dcg": True}, "lr_dcg=True: expected a positive number"),
    ({"ema_decay": 1.0}, r"ema_decay=1.0: expected a number in \[0, 1\)"),
    ({"oof_folds": 1}, "oof_folds=1: expected 0 or an integer >= 2"),
    ({"target_spacing": (6, 0, 10)}, "target_spacing=.*each a positive number, or none"),
    ({"diffusion.num_samples": "x"}, "diffusion.num_samples='x': expected an integer"),
    ({"diffusion.num_samples": 0}, r"diffusion.num_samples=0.*num_samples must be >= 1"),
    ({"denoiser.groups": 0}, r"denoiser.groups=0.*groups=0 must be a positive divisor"),  # not a ZeroDivisionError
    ({"model_overrides": {"dcg": {"roi_size": (8, 8)}}}, "dcg.roi_size=.*3 comma-separated values"),
])
def test_a_value_of_the_wrong_type_or_range_is_a_one_line_value_error(overrides, message):
    """Python values and $MEDISCOPE_SET's JSON go through the same checks as --set text: never a TypeError."""
    with pytest.raises(ValueError, match=message) as info:
        get_profile("smoke", **overrides)
    assert "\n" not in str(info.value)


def test_every_field_and_model_setting_has_a_type_the_parser_reads():
    assert set(LIMITS) <= set(field_types(TrainConfig))
    for name, kind in field_types(TrainConfig).items():
        assert describe(kind, LIMITS.get(name))  # raises TypeError for an annotation it cannot read
    for section, types in model_settings().items():
        assert types and all(describe(kind) for kind in types.values()), section


def test_values_reach_the_config_and_its_json_as_their_declared_types():
    config = get_profile("smoke", **parse_overrides(
        ["input_shape=(64, 64, 32)", "target_spacing=6,6,10", "lr_dcg=1e-3", "amp=AUTO", "grad_clip=none",
         "diffusion.num_samples=4", "dcg.roi_size=8,8,8", "error_weight=2", "baselines=resnet18,"]))
    assert config.input_shape == (64, 64, 32) and config.target_spacing == (6.0, 6.0, 10.0)
    assert config.amp is None and config.grad_clip is None and config.baselines == ("resnet18",)
    assert isinstance(config.error_weight, float) and config.model_overrides["dcg"]["roi_size"] == (8, 8, 8)
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved == config.to_dict()  # nested tuples are lists too, so a resumed run compares equal
    assert saved["model_overrides"] == {"diffusion": {"num_samples": 4, "ddim_steps": 2}, "dcg": {"roi_size": [8, 8, 8]}}
    assert TrainConfig.from_dict(saved) == config


@pytest.mark.parametrize("amp, device, expected", [(None, "cpu", False), (None, "cuda", True), (False, "cuda", False)])
def test_amp_auto_is_cuda_only(amp, device, expected):
    assert get_profile("smoke", amp=amp).use_amp(device) is expected


def test_a_run_written_before_a_field_existed_resumes_only_under_the_value_it_ran_with(tmp_path):
    """``error_weighting`` came later: a run folder without it ran DiffMIC-v2's label weighting,
    so it resumes with 'label' and is refused under the default, label-free one."""
    import json

    from utils.errors import DataError
    from utils.experiment import check_output_dir

    assert get_profile("smoke").error_weighting == "uncertainty"
    config = get_profile("smoke", error_weighting="label")
    saved = config.to_dict()
    del saved["error_weighting"]
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    check_output_dir(tmp_path, config)
    with pytest.raises(DataError, match="error_weighting: 'label' -> 'uncertainty'"):
        check_output_dir(tmp_path, get_profile("smoke"))
