import pytest
import torch

from quant.errors import UserError
from pipeline import sample_inputs, sample_labels, sample_seed


def test_global_seed_changes_every_sample():
    # torch seeds mt19937 with the low 32 bits only: the seed must land there
    _, y0, z0 = sample_inputs(0, range(4), 10, (3, 4, 4))
    _, y1, z1 = sample_inputs(1, range(4), 10, (3, 4, 4))
    assert not torch.equal(z0, z1)
    assert len({sample_seed(s, i) for s in range(3) for i in range(1000)}) == 3000


def test_sample_depends_only_on_seed_and_index():
    _, y, z = sample_inputs(7, [5, 9], 10, (3, 4, 4))
    _, y9, z9 = sample_inputs(7, [9], 10, (3, 4, 4))
    assert torch.equal(z[1], z9[0]) and y[1] == y9[0]
    assert sample_labels(7, 10, 10)[9] == int(y9[0])


def test_seed_range_is_checked():
    with pytest.raises(UserError, match="seed must be in"):
        sample_seed(1 << 12, 0)
    with pytest.raises(UserError, match="exceeds"):
        sample_seed(0, 1 << 20)
