import pytest
import torch

from quant.errors import UserError
from diffusion.sampling import MAX_SEED, SampleRNG, check_seed, sample_inputs, sample_labels


def test_global_seed_changes_every_sample():
    # torch seeds mt19937 with the low 32 bits only; SampleRNG keys on the whole (seed, index)
    _, y0, z0 = sample_inputs(0, range(4), 10, (3, 4, 4))
    _, y1, z1 = sample_inputs(1, range(4), 10, (3, 4, 4))
    assert not torch.equal(z0, z1)
    firsts = {tuple(SampleRNG(s, i).randn((4,)).tolist()) for s in (0, 1, 5, 5 + (1 << 32), (1 << 31) - 1, MAX_SEED)
              for i in range(500)}
    assert len(firsts) == 3000  # every (seed, index) its own stream, also seeds equal modulo 2^32


def test_sample_depends_only_on_seed_and_index():
    _, y, z = sample_inputs(7, [5, 9], 10, (3, 4, 4))
    _, y9, z9 = sample_inputs(7, [9], 10, (3, 4, 4))
    assert torch.equal(z[1], z9[0]) and y[1] == y9[0]
    assert sample_labels(7, 10, 10)[9] == int(y9[0])


def test_seed_range_is_checked():
    assert check_seed((1 << 31) - 1) == (1 << 31) - 1 and check_seed(MAX_SEED) == MAX_SEED
    for bad in (-1, MAX_SEED + 1, 1.5):
        with pytest.raises(UserError, match="--global-seed must be an integer in"):
            check_seed(bad, "--global-seed")
    with pytest.raises(UserError, match="sample index"):
        SampleRNG(0, -1)
    with pytest.raises(UserError, match="--labels: label 10 outside"):
        sample_inputs(0, [0], 10, (3, 2, 2), [10])
