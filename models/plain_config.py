"""Plain-data mixins: configs to dicts and back, tensor outputs to dicts, devices, detached copies.

Configs are saved in checkpoints (loaded with ``torch.load(weights_only=True)``) and in
JSON run folders, so they must be dicts of plain values: tuples are written as lists, and
each dataclass's ``__post_init__`` turns its sequence fields back into tuples.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping, TypeVar

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
