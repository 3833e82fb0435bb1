"""The data-preparation command: discover, split, cache, summarise; one-line errors."""
from utils.data.phantoms import PhantomConfig, write_dataset
from utils.paths import CACHE_DIR_ENV
from utils.prepare_data import main


def test_prepare_data_splits_and_caches_a_dataset(tmp_path, capsys):
    data = tmp_path / "nested" / "MosMedData"
    write_dataset(data, n=12, seed=0, config=PhantomConfig(size=32), progress=False)
    out, cache = tmp_path / "outputs", tmp_path / "cache"
    argv = ["--data-dir", str(tmp_path), "--output-dir", str(out), "--cache-dir", str(cache),
            "--target", "32", "32", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ct0_ct23 layout, 12 scans" in printed
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
    assert main(["--data-dir", str(data), "--output-dir", str(tmp_path / "o"), "--target", "32", "32", "16"]) == 0
    assert len(list((tmp_path / "env_cache").rglob("*.npy"))) == 6
