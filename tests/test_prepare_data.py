"""The data-preparation command: the data step of a run of the same options (discover or generate,
split, cache), a summary, one-line errors; afterwards the run preprocesses nothing."""
import pytest

from utils.data import cache as cache_module
from utils.data.phantoms import PhantomConfig, write_dataset
from utils.experiment import prepare_experiment
from utils.paths import CACHE_DIR_ENV
from utils.prepare_data import main
from utils.training.profiles import get_profile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_data_from_the_environment(monkeypatch):
    """Data only from --data-dir or the phantoms a test asks for, whatever the machine's environment."""
    monkeypatch.delenv("MEDISCOPE_DATA_DIR", raising=False)


def test_prepare_data_splits_and_caches_a_dataset(tmp_path, capsys):
    data = tmp_path / "nested" / "MosMedData"
    write_dataset(data, n=12, seed=0, config=PhantomConfig(size=32), progress=False)
    out, cache = tmp_path / "outputs", tmp_path / "cache"
    argv = ["--profile", "smoke", "--data-dir", str(tmp_path), "--output-dir", str(out), "--cache-dir", str(cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ct0_ct23 layout, 12 scans" in printed and "(input (32, 32, 32))" in printed  # the smoke profile's input
    rows = (out / "splits.csv").read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) == 13
    assert len(list(cache.rglob("*.npy"))) == 12
    # a second run reuses the manifest: same split, nothing recomputed
    before = (out / "splits.csv").read_text()
    assert main(argv) == 0 and (out / "splits.csv").read_text() == before


def test_prepare_data_reports_an_empty_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o"), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty" in err and "\n" not in err
    assert not (tmp_path / "o" / "splits.csv").exists()


def test_prepare_data_caches_where_the_environment_says(tmp_path, monkeypatch):
    data = tmp_path / "MosMedData"
    write_dataset(data, n=6, seed=0, config=PhantomConfig(size=32), progress=False)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env_cache"))
    assert main(["--profile", "smoke", "--data-dir", str(data), "--output-dir", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "env_cache").rglob("*.npy"))) == 6


def test_a_run_of_the_same_options_finds_every_volume_it_reads_already_cached(tmp_path, monkeypatch):
    """The profile's phantoms and preprocessing, its high-resolution copy included (roi_scale 2):
    prepare_experiment afterwards reads exactly the files prepare_data wrote and preprocesses nothing."""
    settings = {"n_phantoms": 6, "phantom_dir": str(tmp_path / "phantoms"), "roi_scale": 2}
    argv = ["--profile", "smoke", "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]) == 0
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")}
    assert len(written) == 12  # 6 phantoms x (input + high-resolution copy)

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the run preprocessed a volume prepare_data should have cached")

    monkeypatch.setattr(cache_module, "preprocess", no_preprocessing)
    exp = prepare_experiment(get_profile("smoke", **settings), tmp_path / "run", cache_dir=tmp_path / "cache",
                             device="cpu", verbose=False)
    read = {c.cache_path(r.path) for c in (exp.cache, exp.hires_cache) for r in exp.records}
    assert read == set(written)
    for split in ("train", "val", "test"):
        exp.datasets[split][0]  # reads its volumes (and the high-resolution copy) from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")} == written


def test_severity_phantoms_get_their_own_five_grade_folder_and_enough_scans(tmp_path, capsys):
    phantoms = tmp_path / "phantoms"
    argv = ["--profile", "smoke", "--label-mode", "severity", "--output-dir", str(tmp_path / "run"), "--no-cache",
            "--set", f"phantom_dir={phantoms}"]
    assert main(argv) == 2  # the smoke profile's 12 phantoms cannot give each of five grades 3 scans
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_phantoms=12" in err and "--set n_phantoms=20" in err
    assert main(argv + ["--set", "n_phantoms=20"]) == 0
    assert "studies layout, 20 scans, labels: severity" in capsys.readouterr().out
    folder = tmp_path / "phantoms_severity" / "studies"
    assert sorted(p.name for p in folder.iterdir()) == [f"CT-{k}" for k in range(5)]
    assert not phantoms.exists()  # the binary set's folder is not written
