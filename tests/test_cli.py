"""Every command line shows its defaults; utils.run and utils.run_notebooks take the same
run options, and the runner hands --cache-dir / --device / --set to the notebooks; a bad --set
value (or $MEDISCOPE_SET) is a one-line error naming key, value and what is accepted."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from utils.cli import SET_KEYS, run_config, run_overrides
from utils.notebook import SET_ENV, resolve_parameters
from utils.paths import CACHE_DIR_ENV, REPO_ROOT
from utils.run_notebooks import run_notebooks
from utils.seeding import DEVICE_ENV_VAR

CLIS = ["run", "run_notebooks", "predict", "benchmark", "benchmark_quality", "prepare_data", "data.phantoms",
        "histogram_baseline"]


def help_text(module: str, capsys) -> str:
    main = importlib.import_module(f"utils.{module}").main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """'--name' -> its whole help entry, from argparse's options section."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            if current == "-h":
                current = "--help"
            entries[current] = stripped
        elif current is not None and stripped:
            entries[current] += " " + stripped
    return entries


@pytest.mark.parametrize("module", CLIS)
def test_every_option_of_every_cli_states_its_default(module, capsys):
    entries = option_entries(help_text(module, capsys))
    assert len(entries) >= 2
    missing = [name for name, entry in entries.items() if name != "--help" and "default" not in entry
               and "required" not in entry]
    assert not missing, f"utils.{module} --help: no default shown for {missing}"


def test_run_and_the_runner_take_the_same_run_options_and_set_lists_its_keys(capsys):
    run, runner = option_entries(help_text("run", capsys)), option_entries(help_text("run_notebooks", capsys))
    assert set(run) - {"--train-only"} <= set(runner)  # the runner always evaluates (notebook 07)
    assert "--gpus" in runner
    flat = " ".join(run["--set"].split()).replace(", ", ",").replace(" ", "")
    assert all(key in flat for key in SET_KEYS) and "amp_dtype" in SET_KEYS


def test_the_runner_hands_cache_device_and_settings_to_the_kernels(tmp_path, monkeypatch):
    for name in (CACHE_DIR_ENV, DEVICE_ENV_VAR, SET_ENV):
        monkeypatch.setenv(name, "")  # restored after the test
    run_notebooks("smoke", data_dir=tmp_path, output_dir=tmp_path / "run", names=(), cache_dir=tmp_path / "cache",
                  device="cpu", overrides={"dcg_epochs": 3, "input_shape": (48, 48, 32)})
    assert os.environ[CACHE_DIR_ENV] == str((tmp_path / "cache").resolve()) and os.environ[DEVICE_ENV_VAR] == "cpu"
    assert json.loads(os.environ[SET_ENV]) == {"dcg_epochs": 3, "input_shape": [48, 48, 32]}
    config = resolve_parameters(output_dir=tmp_path / "run", profile="smoke").config()  # what a notebook builds
    assert config.dcg_epochs == 3 and config.input_shape == (48, 48, 32)


def test_a_bad_setting_for_the_notebooks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(SET_ENV, "dcg_epochs=3")
    with pytest.raises(ValueError, match="JSON object"):
        resolve_parameters(profile="smoke")


# --set values: checked against each field's type and range, a one-line error (exit status 2)

BAD_SETTINGS = [  # (--set item, what the error line must name, what it must say is accepted)
    ("batch_size=abc", "batch_size='abc'", "expected a positive integer"),
    ("lr_dcg=fast", "lr_dcg='fast'", "expected a positive number"),
    ("diffusion.num_samples=x", "diffusion.num_samples='x'", "expected an integer"),
    ("amp=maybe", "amp='maybe'", "expected one of true, false, auto"),
    ("dcg_epochs=1.5", "dcg_epochs='1.5'", "expected an integer >= 0"),
    ("input_shape=64,64", "input_shape='64,64'", "3 comma-separated values, each a positive multiple of 16"),
    ("label_mode=grades", "label_mode='grades'", "one of binary, severity"),
    ("baselines=vgg", "baselines='vgg'", "each one of resnet18, densenet121"),
    ("grad_clip=0", "grad_clip='0'", "a positive number, or none"),
    ("oof_folds=1", "oof_folds='1'", "0 or an integer >= 2"),
    ("seed=-3", "seed='-3'", "an integer in [0, 4294967295]"),
    ("diffusion.num_samples=0", "diffusion.num_samples=0", "num_samples must be >= 1"),
    ("dcg.top_t=2", "dcg.top_t=2.0", "top_t must be in (0, 1]"),
    ("epochs=3", "epochs='3'", "unknown key"),
    ("batch_size", "batch_size", "KEY=VALUE"),
]


def refused(module: str, argv: list[str], capsys) -> str:
    """The one error line of ``python -m utils.<module> argv``, which must exit with status 2."""
    main = importlib.import_module(f"utils.{module}").main
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("item, named, accepted", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_key_value_and_what_is_accepted(item, named, accepted, tmp_path, capsys):
    line = refused("run", ["--profile", "smoke", "--output-dir", str(tmp_path / "run"), "--set", item], capsys)
    assert named in line and accepted in line
    assert not (tmp_path / "run").exists()  # refused before the run folder (and its train_config.json) is made


@pytest.mark.parametrize("module", ["run_notebooks", "prepare_data"])
@pytest.mark.parametrize("item, named, accepted", [BAD_SETTINGS[0], BAD_SETTINGS[3], BAD_SETTINGS[11]])
def test_every_command_with_set_refuses_the_same_way(module, item, named, accepted, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(SET_ENV, raising=False)
    line = refused(module, ["--profile", "smoke", "--output-dir", str(tmp_path / "run"), "--set", item], capsys)
    assert named in line and accepted in line and not (tmp_path / "run").exists()


def test_a_bad_setting_from_the_environment_is_refused_by_the_runner_and_the_notebooks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(SET_ENV, json.dumps({"amp": "maybe"}))
    line = refused("run_notebooks", ["--profile", "smoke", "--output-dir", str(tmp_path / "run")], capsys)
    assert "amp='maybe'" in line and "one of true, false, auto" in line
    with pytest.raises(ValueError, match="amp='maybe'"):
        resolve_parameters(output_dir=tmp_path / "run", profile="smoke").config()  # what each notebook builds


def test_the_label_mode_option_and_a_contradicting_set_are_refused(tmp_path, capsys):
    line = refused("run", ["--label-mode", "severity", "--set", "label_mode=binary"], capsys)
    assert "--label-mode severity contradicts --set label_mode=binary" in line


def test_good_settings_reach_train_config_json_as_their_types(tmp_path):
    from utils.experiment import check_output_dir
    from utils.run import build_parser

    args = build_parser().parse_args(["--profile", "smoke", "--label-mode", "severity", "--seed", "3",
                                      "--set", "input_shape=64,64,32", "--set", "lr_dcg=1e-3", "--set", "amp=auto",
                                      "--set", "diffusion.num_samples=4", "--set", "dcg_epochs=1"])
    config = run_config(args)
    check_output_dir(tmp_path, config)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["input_shape"] == [64, 64, 32] and saved["lr_dcg"] == 1e-3 and saved["amp"] is None
    assert saved["label_mode"] == "severity" and saved["seed"] == 3 and saved["dcg_epochs"] == 1
    assert saved["model_overrides"]["diffusion"]["num_samples"] == 4
    check_output_dir(tmp_path, config)  # the same configuration resumes


def test_a_bad_setting_exits_2_without_a_traceback_as_a_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "utils.run", "--profile", "smoke", "--output-dir", str(tmp_path),
                           "--set", "amp=maybe"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("error: --set amp='maybe': expected one of true, false, auto")


def test_the_runner_generates_severity_phantoms_and_hands_the_label_mode_to_the_notebooks(tmp_path, monkeypatch):
    from utils.run_notebooks import build_parser

    monkeypatch.delenv("MEDISCOPE_DATA_DIR", raising=False)  # the generated phantoms, whatever the machine
    monkeypatch.setenv(SET_ENV, "")  # restored after the test
    args = build_parser().parse_args(["--profile", "smoke", "--label-mode", "severity", "--set", "n_phantoms=20",
                                      "--set", f"phantom_dir={tmp_path / 'phantoms'}"])
    run_notebooks("smoke", output_dir=tmp_path / "run", names=(), progress=False, overrides=run_overrides(args))
    assert sorted(p.name for p in (tmp_path / "phantoms_severity" / "studies").iterdir()) == \
        [f"CT-{k}" for k in range(5)] and not (tmp_path / "phantoms").exists()
    assert json.loads(os.environ[SET_ENV])["label_mode"] == "severity"
    config = resolve_parameters(output_dir=tmp_path / "run", profile="smoke").config()  # what a notebook builds
    assert config.label_mode == "severity" and config.num_classes == 5
