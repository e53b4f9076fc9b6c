import torch

from models import DiT_models, TimestepEmbedder


def upstream_keys(depth, hidden, patch, in_ch, classes, tokens):
    """facebookresearch/DiT's state-dict keys and shapes, written out independently of models.py."""
    out_ch = 2 * in_ch
    keys = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return keys


def test_dit_xl2_upstream_state_dict_loads_strictly():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    expected = upstream_keys(28, 1152, 2, 4, 1000, 256)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # upstream's DiT-XL/2 size
    assert not model.pos_embed.requires_grad
    # a state dict with exactly upstream's keys and shapes loads strictly
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in expected.items()}, strict=True, assign=True)


def test_dit_s2_upstream_keys_and_strict_load():
    model = DiT_models["DiT-S/2"](input_size=32)
    expected = upstream_keys(12, 384, 2, 4, 1000, 256)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    fresh = {k: torch.randn(s) for k, s in expected.items()}
    model.load_state_dict(fresh, strict=True)
    assert torch.equal(model.blocks[3].attn.qkv.weight, fresh["blocks.3.attn.qkv.weight"])


def test_registry_has_upstream_configs():
    for fam in ("XL", "L", "B", "S"):
        for p in (2, 4, 8):
            assert f"DiT-{fam}/{p}" in DiT_models
    m = DiT_models["DiT-B/4"].__call__  # callable factory
    assert callable(m)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_adaln_zero_init_gives_zero_output():
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10).eval()
    x = torch.randn(4, 3, 8, 8)
    out = model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10]))
    assert out.shape == (4, 6, 8, 8)
    assert torch.count_nonzero(out) == 0
    # and every block is the identity at init (gates are zero)
    c = torch.randn(4, 64)
    tok = torch.randn(4, 16, 64)
    assert torch.equal(model.blocks[0](tok, c), tok)


def test_forward_with_cfg_scale_one_equals_forward():
    torch.manual_seed(0)
    model = _randomize(DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)).eval()
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 400, 999])
    y = torch.tensor([1, 2, 7])
    with torch.no_grad():
        ref = model(x, t, y)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0)
    torch.testing.assert_close(guided[:3, :3], ref[:, :3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[:3, 3:], ref[:, 3:], rtol=1e-5, atol=1e-6)
    # guidance changes eps only (first 3 channels), never the variance channels
    with torch.no_grad():
        g4 = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 4.0)
    torch.testing.assert_close(g4[:, 3:], guided[:, 3:])
    assert not torch.allclose(g4[:3, :3], guided[:3, :3])


def test_bf16_model_runs_and_tracks_fp32():
    """model.bfloat16() works as is (the float32 timestep sinusoids are cast to the MLP's dtype)."""
    torch.manual_seed(0)
    model = _randomize(DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)).eval()
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.bfloat16()(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 0.05


def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb, expected)


def test_pos_embed_is_2d_sincos():
    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)
    pe = model.pos_embed[0]  # (16 tokens, 64)
    # as upstream (MAE's meshgrid puts w first): the first half encodes the column, the second the row;
    # token 0 is position (0, 0): sin 0 = 0, cos 0 = 1
    assert torch.allclose(pe[0, :16], torch.zeros(16)) and torch.allclose(pe[0, 16:32], torch.ones(16))
    # tokens 0 and 1 share a row (second half), tokens 0 and 4 a column (first half)
    assert torch.allclose(pe[0, 32:], pe[1, 32:]) and not torch.allclose(pe[0, :32], pe[1, :32])
    assert torch.allclose(pe[0, :32], pe[4, :32]) and not torch.allclose(pe[0, 32:], pe[4, 32:])
