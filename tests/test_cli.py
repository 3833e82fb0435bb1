"""Every command line shows its defaults; utils.run and utils.run_notebooks take the same
run options, and the runner hands --cache-dir / --device / --set to the notebooks."""
import importlib
import json
import os

import pytest

from utils.cli import SET_KEYS
from utils.notebook import SET_ENV, resolve_parameters
from utils.paths import CACHE_DIR_ENV
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
    assert set(run) <= set(runner)
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
