"""A run's first line says which data it uses (``utils.experiment.prepare_experiment``, which
``utils.run`` and every notebook's ``open_experiment`` go through)."""
import pytest

from utils.data.phantoms import SIDECAR, PhantomConfig, write_dataset
from utils.experiment import prepare_experiment
from utils.training.profiles import get_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_says_first_which_data_it_uses_and_whether_they_are_real(tmp_path, capsys):
    config = get_profile("smoke", progress=False)
    data = tmp_path / "data"
    write_dataset(data, 12, seed=0, config=PhantomConfig(size=config.phantom_size), progress=False)
    capsys.readouterr()
    prepare_experiment(config, tmp_path / "run", data, tmp_path / "cache", "cpu", verbose=True)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"data: synthetic phantoms at {data} (12 scans, ct0_ct23 layout: CT-0 ")
    assert first.endswith("-- not real CT")
    (data / SIDECAR).unlink()  # the same files without the generator's record: real data as far as a run can tell
    prepare_experiment(config, tmp_path / "run2", data, tmp_path / "cache", "cpu", verbose=False)  # notebooks: quiet
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"data: MosMedData at {data} (12 scans, ct0_ct23 layout: CT-0 ")


def test_notebook_parameters_refuse_ct_data_in_an_unknown_layout_on_kaggle(tmp_path):
    """Every notebook's parameters cell: the one-line DataError, not the phantoms."""
    from utils.errors import DataError
    from utils.notebook import resolve_parameters

    kaggle_input = tmp_path / "input"
    (kaggle_input / "ct-dataset" / "volumes").mkdir(parents=True)
    (kaggle_input / "ct-dataset" / "volumes" / "case_001.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"1 CT-like files \(e\.g\. ct-dataset/volumes/case_001\.nii\.gz\)"):
        resolve_parameters(environ={}, kaggle_working=tmp_path / "working", kaggle_input=kaggle_input)
