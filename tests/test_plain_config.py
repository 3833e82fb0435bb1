"""The plain-data mixins: a config round-trips through plain data; a batch of tensor outputs
(e.g. the per-volume DCG guidance cache) can be indexed by rows and joined."""
from dataclasses import dataclass

import pytest
import torch

from models.plain_config import TensorFields


@dataclass
class Pair(TensorFields):
    a: torch.Tensor  # (B, 2)
    b: torch.Tensor  # (B, 3, 4)


def pair(rows: int, start: int = 0) -> Pair:
    return Pair(a=torch.arange(start, start + rows * 2).reshape(rows, 2),
                b=torch.arange(start, start + rows * 12).reshape(rows, 3, 4).float())


@pytest.mark.parametrize("rows, expected", [
    (slice(1, 3), [1, 2]),
    (torch.tensor([3, 0]), [3, 0]),
    ([2, 2, 1], [2, 2, 1]),
])
def test_index_takes_the_same_rows_of_every_field(rows, expected):
    full = pair(4)
    got = full.index(rows)
    assert torch.equal(got.a, full.a[expected]) and torch.equal(got.b, full.b[expected])
    assert len(got) == len(expected)


def test_cat_joins_batches_and_inverts_a_split():
    full = pair(5)
    parts = [full.index(slice(0, 2)), full.index(slice(2, 5))]
    joined = Pair.cat(parts)
    assert len(joined) == 5 and all(torch.equal(getattr(joined, k), v) for k, v in full.as_dict().items())
    with pytest.raises(ValueError, match="at least one"):
        Pair.cat([])


def test_rows_put_back_in_dataset_order():
    """What the out-of-fold guidance does: parts of held-out rows, joined, then sorted back."""
    full = pair(6)
    folds = [torch.tensor([4, 1]), torch.tensor([0, 5, 2]), torch.tensor([3])]
    joined = Pair.cat([full.index(rows) for rows in folds])
    restored = joined.index(torch.argsort(torch.cat(folds)))
    assert torch.equal(restored.a, full.a) and torch.equal(restored.b, full.b)
