"""The FP calibration loop: what quantize_dit observes. DiTAS is data-free; its calibration data are the FP
model's own DDPM trajectories from a fixed noise batch (docs/METHOD.md §2)."""
from diffusion.sampling import make_lockstep_sampler, sample_inputs
from quant.calibration.feed import ChunkedLoop, LoopShape

PROGRESS = "calibration sampling loop"  # (the FP model, or with smoothing select a quantized one)


def fp_calibration_loop(model, labels, *, seed=1, steps=100, cfg_scale=1.5, clip_denoised=False, chunks=1,
                        progress=False):
    """quantize_dit's `loop`: one DDPM sampling loop of `model` (FP, classifier-free guidance `cfg_scale`) over
    the fixed noise of samples 0..len(labels)-1 of `seed` (diffusion/sampling.py SampleRNG: every pass sees
    the same trajectory), in `chunks` equal chunks advanced in lockstep (the batch streamed: memory flat in
    the number of labels, quant/calibration/feed.py). clip_denoised: QuantConfig.clips_x0 (QuantDiT.py). A call
    returns the loop's final samples, one (size, C, H, W) tensor per chunk (smoothing select compares them)."""
    labels = [int(y) for y in labels]
    if chunks < 1 or not labels or len(labels) % chunks:
        raise ValueError(f"calibration chunks {chunks}: must divide the {len(labels)} calibration labels into "
                         f"equal chunks")
    size = len(labels) // chunks
    shape = (model.in_channels, model.x_embedder.img_size, model.x_embedder.img_size)
    sampler = make_lockstep_sampler(model, steps, cfg_scale, clip_denoised=clip_denoised)

    def run(indices):
        batches = [sample_inputs(seed, range(c * size, (c + 1) * size), model.num_classes, shape,
                                 labels[c * size:(c + 1) * size]) for c in indices]
        return sampler([(z, y, gens) for gens, y, z in batches], progress=PROGRESS if progress else False)

    rows = size * (2 if cfg_scale > 1 else 1)  # guidance doubles the rows each layer sees
    return ChunkedLoop(run, chunks, LoopShape(steps, rows, model.x_embedder.num_patches))
