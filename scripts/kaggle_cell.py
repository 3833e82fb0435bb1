# MediScopeDiffusion on Kaggle: get the code, install only what the image lacks, check the data, run the notebooks.
import os, shutil, subprocess, sys, tempfile
from pathlib import Path

KAGGLE = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # tests point this at a fake layout
REPO = KAGGLE / "working" / "MediScopeDiffusion"


def step(*args):  # `python -m ARGS` in the repository; its one-line error stops the cell
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"{args[0]} failed"])[-1].removeprefix("error: "))
    sys.stderr.write(done.stderr)


if not (KAGGLE / "input").is_dir():
    print("not on Kaggle: nothing to set up (see the README's quick start)")
else:
    if not REPO.is_dir():  # the code: an attached dataset holding the repository, else a git clone
        found = sorted(p.parent.parent for p in (KAGGLE / "input").glob("**/models/diffmic3d.py"))
        if found:
            shutil.copytree(found[0], REPO)
        elif os.environ.get("MEDISCOPE_CODE_URL"):
            subprocess.run(["git", "clone", "-q", os.environ["MEDISCOPE_CODE_URL"], str(REPO)], check=True)
        else:
            raise RuntimeError("attach the MediScopeDiffusion repository as a dataset, or set MEDISCOPE_CODE_URL")
    if os.environ.get("MEDISCOPE_PIP", "1") == "1":  # only what is missing or too old; Kaggle's CUDA torch is kept
        step("utils.install_missing", "--kaggle-input", str(KAGGLE / "input"))  # wheels dataset, else PyPI
    step("utils.data.discovery", "--kaggle-input", str(KAGGLE / "input"))  # which data; an unknown layout stops here
    scratch = KAGGLE / "temp" if (KAGGLE / "temp").is_dir() else Path(tempfile.gettempdir())
    os.environ.setdefault("MEDISCOPE_CACHE_DIR", str(scratch / "mediscope-cache"))  # not saved with the notebook
    os.environ.setdefault("MEDISCOPE_SET", '{"phantom_dir": "%s"}' % (scratch / "mediscope-phantoms"))
    print(f"code in {REPO}; cache and phantoms in {scratch}; outputs in {KAGGLE / 'working' / 'outputs'}")
    if os.environ.get("MEDISCOPE_SETUP_ONLY") != "1":  # --gpus auto (default): on T4 x2, notebook 06 uses both GPUs
        subprocess.run([sys.executable, "-m", "utils.run_notebooks", "--profile", "full"], cwd=REPO, check=True)
