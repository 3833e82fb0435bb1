"""Data-parallel training (``utils.distributed``) on the CPU: several gloo processes.

* Sharding (pure functions): the ranks' parts of an epoch are disjoint and are, batch by batch,
  the batches one process visits for the same (seed, epoch).
* Gradient equivalence: one optimiser step with 2 ranks x b volumes is the step of one process
  with the global batch 2b, also when a batch splits unevenly (the loss weights); with BatchNorm
  on the CPU each rank normalises its own half (no SyncBatchNorm kernel), and the step is the
  average of the two halves' gradients.
* Resume: a 2-rank fit killed after an epoch and restarted with 2 ranks ends with exactly the
  weights of an uninterrupted one; a restart with one process is refused.
* Timeout: a rank missing a barrier is named within the timeout instead of hanging.
* The whole experiment (smoke profile) under ``torchrun`` with 2 CPU processes: one set of
  outputs, written once; its out-of-fold DCGs, each trained by one rank, equal those trained
  one after another by one process.

Processes are started with ``torch.multiprocessing.spawn`` (MASTER_ADDR 127.0.0.1, a free port,
one intra-op thread each) or, for the whole run, ``python -m utils.run --gpus 2`` (torchrun).
"""
import copy
import csv
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from utils.distributed import (SINGLE, DistContext, RankBatchSampler, RankTimeout, check_batch_size, global_batches,
                               rank_part, steps_per_epoch)
from utils.errors import DataError
from utils.training.checkpoint import load_checkpoint
from utils.training.loop import ORDER_STREAM, FitConfig, epoch_seed, fit, make_epoch_loader

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SEED, LR = 7, 0.1
FIXED = {"val_loss": 0.0, "val_auc": 0.5, "val_acc": 0.5}
KILL = "killed on purpose after epoch 1"


class TinyVolumes(Dataset):
    """``n`` random (1, 5, 5, 5) volumes, labels alternating 0/1, batches as the project's datasets give them."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 5, 5, 5, generator=generator)
        self.labels = torch.arange(n) % 2

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def make_net(kind: str) -> nn.Module:
    """A tiny 3D classifier seeded with SEED: ``plain`` (GroupNorm), ``bn`` (BatchNorm), ``dropout``."""
    torch.manual_seed(SEED)
    norm = nn.BatchNorm3d(4) if kind == "bn" else nn.GroupNorm(2, 4)
    head = [nn.Dropout(0.5)] if kind == "dropout" else []
    return nn.Sequential(nn.Conv3d(1, 4, 3), norm, nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), *head,
                         nn.Linear(4, 2))


def run_fit(kind, dataset, batch_size, path, context, *, epochs=1, evaluate=None, resume_like=False):
    """``utils.training.loop.fit`` of ``make_net(kind)`` with SGD; ``batch_size`` is the GLOBAL batch.
    ``resume_like``: momentum, a per-epoch lr schedule, input noise from fit's generator, and
    ``evaluate(epoch)`` improving every epoch (so the last epoch's weights are kept)."""
    model = make_net(kind)
    torch.manual_seed(1000 + context.rank)  # each rank's own dropout stream: only a per-rank restore resumes it
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9 if resume_like else 0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) if resume_like else None
    current = {}

    def train_step(batch, generator):
        x = batch["image"]
        if resume_like:
            x = x + 0.1 * torch.randn(x.shape, generator=generator)
        return F.cross_entropy(model(x), batch["label"])

    def train_batches(epoch):
        current["epoch"] = epoch
        return make_epoch_loader(dataset, batch_size, SEED, epoch, context=context)

    def evaluate_fn():
        if evaluate is not None:
            return evaluate(current["epoch"])
        return dict(FIXED)

    config = FitConfig(name="toy", epochs=epochs, patience=10 if resume_like else 1, grad_clip=None, seed=SEED,
                       progress=False, log_every=0)
    result = fit(model, optimizer, scheduler, train_step=train_step, evaluate=evaluate_fn,
                 train_batches=train_batches, config=config, checkpoint_path=path, model_config={"net": kind},
                 device=torch.device("cpu"), context=context)
    return model, result


def improving(epoch):
    return {"val_loss": 1.0 / (epoch + 1), "val_auc": 0.5, "val_acc": 0.5}


def killed_on_rank0(rank):
    def evaluate(epoch):
        if rank == 0 and epoch == 1:
            raise RuntimeError(KILL)
        return improving(epoch)
    return evaluate


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, task, out, pg_timeout_s):
    """One rank of a spawned job: joins the gloo group and runs ``task`` (writing under ``out``)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=pg_timeout_s))
    out = Path(out)
    if task == "fits":
        context = DistContext(rank, world)
        run_fit("plain", TinyVolumes(4), 4, out / "even.pth", context)  # 2 ranks x 2
        run_fit("plain", TinyVolumes(8), 3, out / "uneven.pth", context)  # batches of 3 (2 + 1), 3, 2 (1 + 1)
        run_fit("bn", TinyVolumes(4), 4, out / "bn.pth", context)
        run_fit("dropout", TinyVolumes(8), 4, out / "clean.pth", context, epochs=3, evaluate=improving,
                resume_like=True)
        run_fit("dropout", TinyVolumes(8), 4, out / "killed.pth", context, epochs=3,
                evaluate=killed_on_rank0(rank), resume_like=True)  # rank 0 dies in epoch 2: ends the job
    elif task == "restart":
        _, result = run_fit("dropout", TinyVolumes(8), 4, out / "killed.pth", DistContext(rank, world), epochs=3,
                            evaluate=improving, resume_like=True)
        (out / f"restart_rank{rank}.json").write_text(json.dumps({"resumed_from": result.resumed_from}))
    elif task == "timeout" and rank == 1:  # never reaches the barrier; leaves once rank 0 has its verdict
        deadline = time.monotonic() + 10
        while not (out / "timeout.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    elif task == "timeout":
        tic = time.monotonic()
        try:
            DistContext(rank, world, timeout_s=2).barrier("the test barrier")
            outcome = {"raised": None}
        except RankTimeout as err:
            outcome = {"raised": str(err)}
        outcome["seconds"] = time.monotonic() - tic
        (out / "timeout.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def spawn(task, out, world=2, pg_timeout_s=30, deadline_s=60):
    """Run ``task`` on ``world`` ranks; fails (never hangs) after ``deadline_s``."""
    context = mp.spawn(_worker, args=(world, free_port(), task, str(out), pg_timeout_s), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=0.5):
            assert time.monotonic() < deadline, f"'{task}' ranks still running after {deadline_s} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """The 2-rank fits (even, uneven, BatchNorm, an uninterrupted 3-epoch one, and the same one
    killed in epoch 2, which ends the job); their folder."""
    out = tmp_path_factory.mktemp("fits")
    with pytest.raises(mp.ProcessRaisedException, match=KILL):
        spawn("fits", out)
    return out


def weights(path):
    return load_checkpoint(path)["model_state_dict"]


def assert_close(actual, expected, keys=None):
    for key in keys or expected:
        assert torch.allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6), key


# -- 1. sharding ----------------------------------------------------------------------------


def indices_of(loader):
    return [batch["index"].tolist() for batch in loader]


def visited_by_fit(loader):
    """The batches ``fit`` visits: it iterates the loader through a tqdm bar, which (tqdm.auto)
    calls ``iter`` once more, a draw from the loader's generator before the order is drawn;
    the ranks' loaders make the same draws, so they split the same batches either way."""
    return indices_of(tqdm(loader, total=len(loader), disable=True))


def assert_partition(parts, serial):
    """``parts[r][j]`` (rank r's part of global batch j) are, batch by batch, ``serial[j]`` (one
    process's batch j) cut into contiguous parts in rank order, sizes within one of each other;
    over the epoch disjoint, and every scan of ``serial`` exactly once."""
    assert all(len(p) == len(serial) for p in parts), "not the same number of batches"
    for j, batch in enumerate(serial):
        assert sum((p[j] for p in parts), []) == batch, f"batch {j}"
        sizes = [len(p[j]) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, f"batch {j}: part sizes {sizes}"
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)), "a scan on two ranks or twice"
    assert Counter(seen) == Counter(i for b in serial for i in b), "not the scans one process visits"


def rank_parts(dataset, batch_size, epoch, world):
    loaders = [make_epoch_loader(dataset, batch_size, SEED, epoch, context=DistContext(r, world)) for r in range(world)]
    return loaders, [visited_by_fit(loader) for loader in loaders]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n,batch_size", [(12, 4), (13, 4), (14, 4), (10, 3), (7, 6), (9, 9)])
def test_rank_parts_are_the_single_process_batches(world, n, batch_size):
    dataset = TinyVolumes(n)
    for epoch in (0, 3):
        # the ranks iterated bare split what one process visits bare (fit's way: visited_by_fit)
        bare = [[indices_of(make_epoch_loader(dataset, batch_size, SEED, epoch, context=DistContext(r, world)))
                 for r in range(world)], indices_of(make_epoch_loader(dataset, batch_size, SEED, epoch))]
        serial = visited_by_fit(make_epoch_loader(dataset, batch_size, SEED, epoch))
        order = [i for batch in serial for i in batch]
        loaders, parts = rank_parts(dataset, batch_size, epoch, world)
        last = n % batch_size
        if 1 < last < world:  # documented: a last batch with fewer volumes than ranks is dropped
            assert all(len(p) == len(serial) - 1 for p in parts)
            serial, bare[1] = serial[:-1], bare[1][:-1]
        else:
            assert steps_per_epoch(n, batch_size, world) == len(make_epoch_loader(dataset, batch_size, SEED, epoch))
        assert_partition(parts, serial)
        assert_partition(*bare)
        assert global_batches(order, batch_size, world) == serial
        for r in range(world):  # the sampler alone: this rank's parts of the generator's permutation
            seed = epoch_seed(SEED, epoch, ORDER_STREAM)
            sampler = RankBatchSampler(n, batch_size, DistContext(r, world), torch.Generator().manual_seed(seed))
            permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            assert list(sampler) == [rank_part(b, r, world) for b in global_batches(permutation, batch_size, world)]
            assert steps_per_epoch(n, batch_size, world) == len(sampler) == len(loaders[r]) == len(parts[r])


def test_a_dropped_or_duplicated_scan_is_detected():
    """The partition check above fails for a rank part that loses or repeats a scan."""
    dataset = TinyVolumes(12)
    serial = visited_by_fit(make_epoch_loader(dataset, 4, SEED, 0))
    _, parts = rank_parts(dataset, 4, 0, 2)
    assert_partition(parts, serial)
    for broken in ([parts[0][0][:-1]], [parts[0][0] + parts[1][0][:1]], [parts[0][0][:1] * 2]):
        bad = [[broken[0]] + parts[0][1:], parts[1]]
        with pytest.raises(AssertionError):
            assert_partition(bad, serial)
    with pytest.raises(AssertionError, match="twice"):  # the same batch twice in an epoch
        assert_partition([[parts[0][0]] * 2, [parts[1][0]] * 2], [serial[0]] * 2)


def test_steps_per_epoch_matches_one_process_loader():
    for n in range(2, 30):
        for batch_size in (2, 3, 4, 8):
            loader = make_epoch_loader(TinyVolumes(n), batch_size, SEED, 0)
            assert steps_per_epoch(n, batch_size) == len(loader) == len(list(loader)), (n, batch_size)
            assert steps_per_epoch(n, batch_size, 2) == len(loader), (n, batch_size)


def test_batch_smaller_than_world_is_refused():
    with pytest.raises(ValueError, match="batch_size=1") as err:
        check_batch_size(1, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="global batch"):
        RankBatchSampler(8, 2, DistContext(0, 3), torch.Generator())
    with pytest.raises(ValueError):
        make_epoch_loader(TinyVolumes(8), 1, SEED, 0, context=DistContext(1, 2))
    check_batch_size(2, 2)


@pytest.mark.parametrize("n", [0, 1, 5, 12])
def test_shard_covers_every_scan_once(n):
    for world in (1, 2, 3):
        shards = [DistContext(r, world).shard(n) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))


# -- 2. gradient equivalence --------------------------------------------------------------


def test_two_ranks_take_the_step_of_the_global_batch(fits, tmp_path):
    for name, n, batch_size in (("even", 4, 4), ("uneven", 8, 3)):
        serial, result = run_fit("plain", TinyVolumes(n), batch_size, tmp_path / f"{name}.pth", SINGLE)
        saved = load_checkpoint(fits / f"{name}.pth")
        assert saved["fit"]["world_size"] == 2 and saved["fit"]["complete"]
        assert_close(saved["model_state_dict"], serial.state_dict())
        assert saved["fit"]["history"]["train_loss"] == pytest.approx(result.history["train_loss"], rel=1e-5)
        moved = make_net("plain").state_dict()
        assert not torch.allclose(moved["5.weight"], serial.state_dict()["5.weight"])  # a step was taken


def test_batchnorm_on_cpu_each_rank_normalises_its_half(fits):
    """As built on the CPU (no SyncBatchNorm kernel): the step is the mean of the two halves'
    gradients, each half normalised alone; rank 0's running statistics are its half's."""
    dataset, net = TinyVolumes(4), make_net("bn")
    [batch] = visited_by_fit(make_epoch_loader(dataset, 4, SEED, 0))
    grads, halves = [], []
    for r in range(2):
        half = copy.deepcopy(net).train()
        part = default_collate([dataset[i] for i in rank_part(batch, r, 2)])
        F.cross_entropy(half(part["image"]), part["label"]).backward()
        grads.append({k: p.grad for k, p in half.named_parameters()})
        halves.append(half)
    expected = {k: p.detach() - LR * (grads[0][k] + grads[1][k]) / 2 for k, p in net.named_parameters()}
    saved = weights(fits / "bn.pth")
    assert_close(saved, expected)
    assert_close(saved, halves[0].state_dict(), ["1.running_mean", "1.running_var"])
    whole = copy.deepcopy(net).train()
    part = default_collate([dataset[i] for i in batch])
    F.cross_entropy(whole(part["image"]), part["label"]).backward()
    one_process = {k: p.detach() - LR * p.grad for k, p in whole.named_parameters()}
    assert not torch.allclose(saved["0.weight"], one_process["0.weight"], atol=1e-6)  # really per-half statistics


# -- 3. resume -------------------------------------------------------------------------------


def test_killed_two_rank_fit_resumes_to_the_uninterrupted_weights(fits):
    path = fits / "killed.pth"
    state = load_checkpoint(path)["fit"]
    assert (state["epoch"], state["complete"], state["world_size"], len(state["rank_rng"])) == (1, False, 2, 2)

    with pytest.raises(DataError, match=r"2 process\(es\).*--gpus 2") as err:  # one process may not resume it
        run_fit("dropout", TinyVolumes(8), 4, path, SINGLE, epochs=3, evaluate=improving, resume_like=True)
    assert "\n" not in str(err.value) and load_checkpoint(path)["fit"]["epoch"] == 1

    spawn("restart", fits)
    assert json.loads((fits / "restart_rank0.json").read_text()) == {"resumed_from": 1}
    assert json.loads((fits / "restart_rank1.json").read_text()) == {"resumed_from": 1}
    resumed, clean = load_checkpoint(path), load_checkpoint(fits / "clean.pth")
    assert resumed["fit"]["complete"] and resumed["fit"]["best"]["epoch"] == 3
    assert resumed["fit"]["history"] == clean["fit"]["history"]
    for key, value in clean["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][key], value), key
    assert not torch.equal(clean["model_state_dict"]["6.weight"], make_net("dropout").state_dict()["6.weight"])


# -- 4. timeout ------------------------------------------------------------------------------


def test_missing_rank_times_out_naming_it(tmp_path):
    tic = time.monotonic()
    spawn("timeout", tmp_path, pg_timeout_s=5, deadline_s=30)
    outcome = json.loads((tmp_path / "timeout.json").read_text())
    assert outcome["raised"] is not None, "the barrier passed without rank 1"
    assert re.search(r"\branks? \[?1\b", outcome["raised"], re.IGNORECASE), outcome["raised"]
    assert "the test barrier" in outcome["raised"] and "\n" not in outcome["raised"]
    assert 1.5 <= outcome["seconds"] < 6
    assert time.monotonic() - tic < 30


# -- 5, 6. the whole experiment under torchrun -------------------------------------------------


def run_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDISCOPE_", "TORCHELASTIC_")) and k not in drop}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# the smoke profile with one epoch per stage and ResNet-18 as its baseline (DenseNet-121 trains
# through the same data-parallel fit loop)
ONE_EPOCH = ("dcg_epochs=1", "diffusion_epochs=1", "baseline_epochs=1", "baselines=resnet18")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished 2-process smoke run (``--gpus 2``: utils.run starts torchrun): (dirs, stdout)."""
    root = tmp_path_factory.mktemp("smoke2")
    dirs = {"out": root / "out", "cache": root / "cache", "phantoms": root / "phantoms"}
    command = [sys.executable, "-m", "utils.run", "--profile", "smoke", "--device", "cpu", "--gpus", "2",
               "--output-dir", str(dirs["out"]), "--cache-dir", str(dirs["cache"]),
               "--set", f"phantom_dir={dirs['phantoms']}", *(a for s in ONE_EPOCH for a in ("--set", s))]
    run = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return dirs, run.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_process_run_writes_one_set_of_outputs(smoke_run):
    dirs, stdout = smoke_run
    out = dirs["out"]
    for name in ("evaluation_results.csv", "predictions.csv", "history.json", "provenance.json",
                 "diffmic3d_enhanced_model.pth", "timings.json", "splits.csv"):
        assert list(out.rglob(name)) == [out / name], name
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("dcg*.pth")) == [
        "checkpoints/dcg.pth", "checkpoints/dcg_fold0.pth", "checkpoints/dcg_fold1.pth"]
    assert not list(out.rglob("*.best.pth"))
    assert not [p for d in (out, dirs["cache"]) for p in d.rglob(".*.tmp*")], "temporary files left"
    assert stdout.count("| Model |") == 1 and stdout.count("Test split (") == 1, stdout[-3000:]

    test_paths = [row["path"] for row in read_csv(out / "splits.csv") if row["split"] == "test"]
    rows = read_csv(out / "predictions.csv")
    models = list(dict.fromkeys(row["model"] for row in rows))
    assert "DiffMIC-3D" in models and len(models) >= 3
    for model in models:
        assert [row["path"] for row in rows if row["model"] == model] == test_paths, model

    for name in ("splits.csv", "predictions.csv"):  # paths relative to the data folder
        paths = [row["path"] for row in read_csv(out / name)]
        assert paths and not any(p.startswith("/") for p in paths), name
        assert all((dirs["phantoms"] / p).is_file() for p in paths), name
    figures = out / "figures"  # every figure once, as PNG and PDF
    expected = {"confusion_matrix", "confusion_matrices", "roc_curves", "reliability_diagram", "learning_curves",
                "saliency_rois", "denoising_trajectory", "baseline_gradcam"}
    for stem in expected:
        assert (figures / f"{stem}.png").stat().st_size > 1000 and (figures / f"{stem}.pdf").is_file(), stem
    assert {p.stem for p in figures.glob("*.png")} == {p.stem for p in figures.glob("*.pdf")}

    starts = json.loads((out / "provenance.json").read_text())["starts"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2 and starts[0]["device"] == "cpu"
    assert [d["device"] for d in starts[0]["rank_devices"]] == ["cpu", "cpu"]
    config = json.loads((out / "train_config.json").read_text())
    block = config["distributed"]
    assert block["world_size"] == 2 and block["global_batch"] == config["batch_size"] == sum(block["per_rank_batch"])
    assert block["backend"] == "gloo" and block["sync_batchnorm"] is False
    for name in ("dcg.pth", "diffusion.pth"):
        assert load_checkpoint(out / "checkpoints" / name)["fit"]["world_size"] == 2, name


def test_out_of_fold_dcgs_on_two_ranks_equal_one_process(smoke_run, tmp_path, monkeypatch):
    """Fold k trained by rank k (2-process run) == folds trained one after another by one process
    (same seed, one thread); the main checkpoint keeps exactly those weights as its fold DCGs."""
    from utils.experiment import prepare_experiment
    from utils.pipeline import build_model, out_of_fold_guidance
    from utils.training.profiles import get_profile

    dirs, _ = smoke_run
    monkeypatch.delenv("MEDISCOPE_DATA_DIR", raising=False)
    config = get_profile("smoke", phantom_dir=str(dirs["phantoms"]),
                         **{k: v for k, v in (s.split("=") for s in ONE_EPOCH) if k != "baselines"},
                         baselines=("resnet18",))
    exp = prepare_experiment(config, tmp_path / "out", cache_dir=dirs["cache"], device="cpu", verbose=False)
    assert (tmp_path / "out" / "splits.csv").read_text() == (dirs["out"] / "splits.csv").read_text()
    guidance = out_of_fold_guidance(exp, build_model(exp))
    assert len(guidance.global_probs) == len(exp.datasets["train_plain"])
    main = weights(dirs["out"] / "diffmic3d_enhanced_model.pth")
    for k in range(config.oof_folds):
        two, one = (weights(d / "checkpoints" / f"dcg_fold{k}.pth") for d in (dirs["out"], tmp_path / "out"))
        assert two.keys() == one.keys()
        for key, value in one.items():
            assert torch.equal(two[key], value), (k, key)
            assert torch.equal(main[f"fold_dcgs.{k}.{key.removeprefix('dcg.')}"], value), (k, key)


# -- 7. a rank that dies ---------------------------------------------------------------------

DIES_ON_RANK_1 = '''
import torch
from utils.distributed import init_from_env

context, _ = init_from_env(torch.device("cpu"), timeout_s=120)
if context.rank == 1:
    raise SystemExit("rank 1 fails on purpose")
context.barrier("waiting for rank 1")  # would wait 120 s: torchrun must end it first
'''


def test_a_dying_rank_ends_the_job_at_once_naming_it(tmp_path, capsys):
    from utils.launch import launch

    (tmp_path / "dies_on_rank_1.py").write_text(DIES_ON_RANK_1)
    env = {**run_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    tic = time.monotonic()
    code = launch("dies_on_rank_1", [], 2, env=env)
    seconds = time.monotonic() - tic
    out, err = capsys.readouterr()
    assert code != 0 and seconds < 60, (code, seconds)  # not the barrier's 120 s: no hang
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", out), out[-2000:]  # torchrun's report names it
    assert "rank 1 fails on purpose" in out
    assert err.strip().splitlines()[-1].startswith("error: the 2-process run of dies_on_rank_1 failed")
