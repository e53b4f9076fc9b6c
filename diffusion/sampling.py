"""DDPM sampling with classifier-free guidance and per-sample random streams: what the calibration's FP loop
and the sampling scripts share.

Sample i's label and noise (x_T and every step's noise) come from a random stream keyed by (seed, i) alone
(SampleRNG), so a set of images does not depend on batch size, world size or resumption.
"""
import numpy as np
import torch

from diffusion import create_diffusion
from quant.errors import UserError

MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_SEED = (1 << 63) - 1


def check_seed(seed, flag="--seed"):
    """A seed a user typed: any integer in [0, 2^63 - 1]; else a one-line error naming the flag."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


class SampleRNG:
    """The random stream of one sample: numpy's PCG64 keyed by SeedSequence(seed, spawn_key=(index,)).

    Independent streams for every (seed, index) with any 63-bit seed (torch's CPU generator keeps only
    the low 32 bits of its seed, so it cannot key on both). Draws, in order: the label (if not given),
    x_T, then every denoising step's noise.
    """

    def __init__(self, seed, index):
        if not isinstance(index, int) or index < 0:
            raise UserError(f"sample index must be a non-negative integer, got {index!r}")
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(check_seed(seed), spawn_key=(index,))))

    def randn(self, shape):
        return torch.from_numpy(self.rng.standard_normal(tuple(shape), dtype=np.float32))

    def label(self, num_classes):
        return int(self.rng.integers(num_classes))


def sample_labels(seed, n, num_classes):
    """The labels sample_inputs draws for samples 0..n-1 (to score class-conditional batches)."""
    return [SampleRNG(seed, i).label(num_classes) for i in range(n)]


def sample_inputs(seed, indices, num_classes, shape, labels=None, label_flag="--labels"):
    """Per-sample random streams (SampleRNG), labels and x_T for the given global sample indices."""
    gens = [SampleRNG(seed, int(i)) for i in indices]
    if labels is None:
        labels = [g.label(num_classes) for g in gens]
    else:
        for y in labels:
            if not 0 <= int(y) < num_classes:
                raise UserError(f"{label_flag}: label {y} outside [0, {num_classes})")
    z = torch.stack([g.randn(shape) for g in gens])
    return gens, torch.tensor([int(y) for y in labels]), z


def make_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype="fp32"):
    """A function (z, y, gens, progress=False) -> samples in model space, DDPM with classifier-free
    guidance; progress: a bool, or the description of the progress bar (what this loop is for).

    dtype: the model's dtype (cast_for_sampling); its input is cast to it and its output back to float32."""
    lockstep = make_lockstep_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype)
    return lambda z, y, gens, progress=False: lockstep([(z, y, gens)], progress)[0]


def make_lockstep_sampler(model, num_sampling_steps, cfg_scale, clip_denoised, dtype="fp32"):
    """A function (batches, progress=False) -> [samples of each batch]: make_sampler's sampling of several
    batches [(z, y, gens), ...] advanced in lockstep, every batch's step t (in order) before any step
    t - 1 (the calibration's FP loop in chunks, quant/calibration/feed.py). The progress bar counts steps."""
    diffusion = create_diffusion(str(num_sampling_steps))
    using_cfg = cfg_scale > 1.0

    def loop(z, y, gens, progress):
        device = next(model.parameters()).device
        if using_cfg:
            z = torch.cat([z, z], 0)
            y = torch.cat([y, torch.full_like(y, model.num_classes)], 0)
            kwargs = dict(y=y.to(device), cfg_scale=cfg_scale)
            fn = model.forward_with_cfg
        else:
            kwargs = dict(y=y.to(device))
            fn = model.forward
        if dtype != "fp32":
            fn = _in_dtype(fn, MODEL_DTYPES[dtype])

        def noise_fn(x):
            eps = torch.stack([g.randn(x.shape[1:]) for g in gens]).to(x.device, x.dtype)
            return torch.cat([eps, eps], 0) if using_cfg else eps

        return diffusion.p_sample_loop_progressive(fn, z.shape, z.to(device), clip_denoised=clip_denoised,
                                                   model_kwargs=kwargs, progress=progress, device=device,
                                                   noise_fn=noise_fn)

    def sample(batches, progress=False):
        loops = [loop(z, y, gens, progress if i == 0 else False) for i, (z, y, gens) in enumerate(batches)]
        final = [None] * len(loops)
        for outs in zip(*loops):  # one step of every batch, in order
            final = list(outs)
        return [out["sample"][:len(z)] for out, (z, _, _) in zip(final, batches)]

    return sample


def _in_dtype(fn, dtype):
    def run(x, t, **kwargs):
        return fn(x.to(dtype), t, **kwargs).float()
    return run
