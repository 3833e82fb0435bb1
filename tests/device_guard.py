"""A stand-in accelerator for CPU-only tests: catches tensors on two devices meeting in one op.

On a GPU, ``torch.tensor(shape) <= boxes_on_cuda`` raises "Expected all tensors to be on the
same device"; on a CPU-only machine every tensor is on the CPU and such a bug cannot show.
:class:`StandInDevice` makes it show without a GPU. Inside ``with StandInDevice():``

* the device ``meta`` stands in for the accelerator: ``x.to("meta")``, ``model.to("meta")``,
  ``torch.zeros(..., device="meta")``, ``torch.tensor(data, device=x.device)`` make tensors that
  report ``device='meta'`` but hold real CPU data (a wrapper subclass, ``OnStandIn``), so all
  arithmetic runs and gives the CPU's numbers;
* an op that gets a stand-in tensor and a CPU tensor with at least one dimension raises the
  same RuntimeError CUDA does (CUDA, like this guard, accepts 0-dim CPU tensors as scalars and
  CPU index tensors);
* ``.cpu()`` / ``.to("cpu")`` give plain CPU tensors; ``.numpy()`` of a stand-in tensor
  fails, as it does for a CUDA tensor;
* ``torch.Generator("meta")`` gives a CPU generator (a CUDA generator has no stand-in).

``utils.seeding.pick_device`` accepts ``meta``, so code that takes its device from
``$MEDISCOPE_DEVICE`` (the notebooks, ``utils.run``) runs on the stand-in unchanged.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STAND_IN = torch.device("meta")
_CPU = torch.device("cpu")
# ops where a CPU tensor may meet a device tensor on a real GPU as well
_MIXING_ALLOWED = {"copy_", "index", "_unsafe_index", "index_put", "index_put_", "_unsafe_index_put", "_index_put_impl_",
                   "_to_copy", "lift_fresh"}


class OnStandIn(torch.Tensor):
    """A tensor on the stand-in device: reports ``meta``, holds its CPU data in ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=STAND_IN,
                                                  requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"OnStandIn({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if func.overloadpacket.__name__ not in _MIXING_ALLOWED:
            cpu = next((t for t in tensors if not isinstance(t, OnStandIn) and t.dim() > 0), None)
            if cpu is not None:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, "
                    f"{STAND_IN} (standing in for cuda) and cpu! ({func.overloadpacket.__name__}: a CPU tensor "
                    f"of shape {tuple(cpu.shape)} met a device tensor)")
        if func.overloadpacket.__name__ == "_to_copy" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            return func(*tree_map(_unwrap, args), **kwargs)  # .cpu(): a plain tensor
        known = {id(t.elem): t for t in tensors if isinstance(t, OnStandIn)}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, _on_cpu(kwargs)))
        return tree_map(lambda x: _wrap(x, known), out)


def _unwrap(x):
    return x.elem if isinstance(x, OnStandIn) else x


def _wrap(x, known=None):
    if isinstance(x, torch.Tensor) and not isinstance(x, OnStandIn):
        same = (known or {}).get(id(x))  # an in-place op returns its input
        return same if same is not None else OnStandIn(x)
    return x


def _is_stand_in(device) -> bool:
    try:
        return device is not None and torch.device(device).type == STAND_IN.type
    except (RuntimeError, TypeError):
        return False


def _on_cpu(kwargs: dict) -> dict:
    return {**kwargs, "device": _CPU} if _is_stand_in(kwargs.get("device")) else kwargs


class _Factories(TorchDispatchMode):
    """aten factory calls for the stand-in (``arange(device=meta)``, also from inside torch's own
    decompositions) make CPU data wrapped as :class:`OnStandIn`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_stand_in(kwargs.get("device")):
            return tree_map(_wrap, func(*args, **_on_cpu(kwargs)))
        return func(*args, **kwargs)


class _Conversions(TorchFunctionMode):
    """Python-level calls that pick a device: ``.to(meta)``, ``torch.tensor(data, device=meta)``;
    and the host reads that CUDA tensors allow (``tolist``, ``format``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.tolist, torch.Tensor.__format__) and isinstance(args[0], OnStandIn):
            return func(args[0].elem, *args[1:], **kwargs)  # both work on CUDA tensors (via the host)
        target = kwargs.get("device")
        if func in (torch.Tensor.to, torch.Tensor.cuda) or getattr(func, "__name__", "") == "to":
            target = target or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if _is_stand_in(target):
                args = tuple(_CPU if _is_stand_in(a) and isinstance(a, (str, torch.device)) else a for a in args)
                return _wrap(func(*args, **_on_cpu(kwargs)))
            return func(*args, **kwargs)
        if _is_stand_in(target):
            return tree_map(_wrap, func(*args, **_on_cpu(kwargs)))
        return func(*args, **kwargs)


_RealGenerator = torch.Generator


class _StandInGenerator(_RealGenerator):
    """``torch.Generator("meta")`` is not possible; the stand-in's generators draw on the CPU
    (code that draws on ``generator.device`` and moves the noise to the data still runs)."""

    def __new__(cls, device="cpu"):
        return _RealGenerator.__new__(cls, _CPU if _is_stand_in(device) else device)

    def __init__(self, device="cpu"):
        pass


_InferenceMode = torch.autograd.grad_mode.inference_mode
_REAL_INFERENCE = (_InferenceMode.__enter__, _InferenceMode.__exit__)


def _no_grad_enter(self):
    self._grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _no_grad_exit(self, *exc):
    torch.set_grad_enabled(self._grad_was)


class StandInDevice:
    """Context manager: tensors made for the ``meta`` device become :class:`OnStandIn`;
    ``torch.Generator`` accepts the stand-in device; ``torch.inference_mode`` acts as
    ``no_grad`` (inference mode cannot version the in-place results of a Python wrapper
    tensor; what it adds over no_grad is speed, not device placement)."""

    def __enter__(self):
        self._modes = (_Conversions(), _Factories())
        for mode in self._modes:
            mode.__enter__()
        torch.Generator = _StandInGenerator
        _InferenceMode.__enter__, _InferenceMode.__exit__ = _no_grad_enter, _no_grad_exit
        return self

    def __exit__(self, *exc):
        torch.Generator = _RealGenerator
        _InferenceMode.__enter__, _InferenceMode.__exit__ = _REAL_INFERENCE
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
