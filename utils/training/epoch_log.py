"""What a training stage prints (``utils.training.loop.fit``), as plain lines for the ``mediscope`` log.

A run trains up to seven stages (the DCG, its out-of-fold copies, phase 2, two baselines) of up
to 40 epochs each; a line per epoch buries what matters. So each stage logs, at INFO:

* at most one **progress line** every ``FitConfig.log_every`` epochs (the latest epoch's
  validation AUC and losses, the best epoch so far, seconds per epoch), and
* one **summary line** at its end (epochs run and why it stopped, the selected epoch with its
  validation AUC / loss / accuracy, the time), or one line when a finished stage is only loaded.

Every epoch's full line goes to the log at DEBUG (``logging.getLogger("mediscope").setLevel
(logging.DEBUG)`` shows them, and any handler at DEBUG, e.g. a file, keeps them); the numbers of
every epoch are in the stage's checkpoint and in ``history.json`` too. Each line starts with the
stage's name in brackets, e.g. ``[dcg fold 2/3]``.
"""
from __future__ import annotations

from collections.abc import Mapping


def epoch_line(name: str, epoch: int, epochs: int, row: Mapping[str, float], seconds: float, improved: bool) -> str:
    """The full line of one epoch (DEBUG): ``[name] epoch 3/20 train_loss ... lr ... 5.4s *best``."""
    return (f"[{name}] epoch {epoch}/{epochs} train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"val_auc {row['val_auc']:.3f} val_acc {row['val_acc']:.3f} lr {row['lr']:.2e} {seconds:.1f}s"
            f"{' *best' if improved else ''}")


def reports_progress(epoch: int, epochs: int, every: int) -> bool:
    """Whether epoch ``epoch`` (1-based) of ``epochs`` gets a progress line: every ``every``-th
    epoch but the last (the summary covers it); never when ``every`` is 0."""
    return every > 0 and epoch % every == 0 and epoch < epochs


def progress_line(name: str, epoch: int, epochs: int, row: Mapping[str, float], best: Mapping,
                  seconds_per_epoch: float) -> str:
    """``[name] epoch 10/20: val AUC 0.734 (train loss 0.2690, val loss 0.2664); best so far epoch 8 (val AUC
    0.750); 5.4 s/epoch``; ``best so far`` is left out before any epoch could be selected."""
    so_far = f"; best so far epoch {best['epoch']} (val AUC {best['val_auc']:.3f})" if best.get("epoch") else ""
    return (f"[{name}] epoch {epoch}/{epochs}: val AUC {row['val_auc']:.3f} (train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}){so_far}; {seconds_per_epoch:.1f} s/epoch")


def summary_line(name: str, epochs_run: int, epochs: int, best: Mapping, seconds: float, stopped_early: bool,
                 patience: int, resumed_from: int = 0) -> str:
    """The stage's one line at its end, e.g. ``[diffusion] done: 23/40 epochs (early stop: no better validation
    AUC for 7 epochs); selected epoch 16: val AUC 0.750, val loss 0.2484, val acc 0.688; 124 s``."""
    why = f" (early stop: no better validation AUC for {patience} epochs)" if stopped_early else ""
    resumed = f", resumed after epoch {resumed_from}" if resumed_from else ""
    took = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return (f"[{name}] done: {epochs_run}/{epochs} epochs{why}; selected epoch {best['epoch']}: "
            f"val AUC {best['val_auc']:.3f}, val loss {best['val_loss']:.4f}, val acc {best['val_acc']:.3f}; "
            f"{took}{resumed}")


def loaded_line(name: str, epochs_run: int, best: Mapping) -> str:
    """The one line of a stage whose checkpoint says it finished: it is loaded, not trained."""
    return (f"[{name}] finished earlier, loaded: {epochs_run} epochs; selected epoch {best['epoch']}: "
            f"val AUC {best['val_auc']:.3f}")
