"""Plain-data mixins: configs to dicts and back; tensor outputs to dicts, devices, rows, batches.

Configs are saved in checkpoints (loaded with ``torch.load(weights_only=True)``) and in
JSON run folders, so they must be dicts of plain values: tuples are written as lists, and
each dataclass's ``__post_init__`` turns its sequence fields back into tuples.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping, Sequence, TypeVar

import torch

C = TypeVar("C", bound="PlainConfig")


class PlainConfig:
    """Mixin for ``@dataclass`` configs: ``to_dict`` / ``from_dict`` with unknown keys refused."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for JSON files and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Inverse of ``to_dict``; unknown keys are an error (a stale or foreign config)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}")
        return cls(**data)


T = TypeVar("T", bound="TensorFields")


class TensorFields:
    """Mixin for ``@dataclass`` outputs whose fields are all tensors (``DCGOutput``, ``Priors``)."""

    def as_dict(self) -> dict[str, Any]:
        """Field name -> tensor (for ``torch.save`` caches); ``cls(**d)`` restores."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def detach(self: T) -> T:
        """A copy with every tensor detached from the autograd graph."""
        return type(self)(**{k: v.detach() for k, v in self.as_dict().items()})

    def to(self: T, device) -> T:
        """A copy with every tensor moved to ``device``."""
        return type(self)(**{k: v.to(device) for k, v in self.as_dict().items()})

    def index(self: T, rows) -> T:
        """Rows ``rows`` (a slice, or an index tensor / sequence on any device) of every field
        along dim 0, the batch dimension: (B, ...) -> (len(rows), ...)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows)
        return type(self)(**{k: v[rows.to(v.device) if torch.is_tensor(rows) else rows]
                             for k, v in self.as_dict().items()})

    def __len__(self) -> int:
        """The batch size B (dim 0 of the fields)."""
        return len(next(iter(self.as_dict().values())))

    @classmethod
    def cat(cls: type[T], parts: Sequence[T]) -> T:
        """The batches ``parts`` joined along dim 0, field by field (e.g. a per-volume cache)."""
        if not parts:
            raise ValueError(f"{cls.__name__}.cat needs at least one part")
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})
