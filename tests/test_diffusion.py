import numpy as np
import torch

from diffusion import create_diffusion, space_timesteps
from diffusion.gaussian_diffusion import get_named_beta_schedule


def test_respacing_keeps_both_ends():
    steps = space_timesteps(1000, "50")
    assert len(steps) == 50 and 0 in steps and 999 in steps
    s = sorted(steps)
    # evenly strided: round(i * 999 / 49)
    assert s == [round(i * 999 / 49) for i in range(50)]
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,10")) == 20 and 499 in space_timesteps(1000, "10,10")
    assert space_timesteps(1000, [1000]) == set(range(1000))


def test_respaced_betas_preserve_alphas_cumprod():
    full = create_diffusion("")
    spaced = create_diffusion("25")
    assert spaced.num_timesteps == 25 and full.num_timesteps == 1000
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-12


def test_respaced_model_sees_original_timesteps():
    d = create_diffusion("4")
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d.p_sample_loop(model, (2, 3, 4, 4), noise=torch.zeros(2, 3, 4, 4), device="cpu", noise_fn=torch.zeros_like)
    assert seen == [[999, 999], [666, 666], [333, 333], [0, 0]]


def test_explicit_noise_source_makes_sampling_deterministic():
    d = create_diffusion("10")
    w = torch.randn(6, 3)

    def model(x, t, **kw):  # a fixed, t-dependent toy eps/var predictor
        h = torch.einsum("bchw,oc->bohw", x, w) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        return torch.tanh(h)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(2, 3, 4, 4, generator=g)
        return d.p_sample_loop(model, z.shape, noise=z, device="cpu",
                               noise_fn=lambda x: torch.randn(x.shape, generator=g))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_training_loss_is_mse_plus_vb():
    d = create_diffusion("")
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])

    def model(x, t, **kw):
        return torch.cat([noise + 0.1, torch.zeros_like(x)], 1)  # eps off by 0.1 everywhere

    terms = d.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(terms["mse"], torch.full((4,), 0.01), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.all(terms["vb"] >= 0)
