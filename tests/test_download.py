import os

import pytest
import torch

from quant.errors import UserError
from download import dit_to_diffusers, diffusers_to_dit, find_model, load_diffusers_folder, load_model_state
from models import DiT_models


def small_model():
    return DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)


def test_diffusers_key_remap_both_ways(tmp_path):
    model = small_model()
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    dif = dit_to_diffusers(sd, num_layers=2)
    # diffusers' names (DiTTransformer2DModel), q/k/v split, embedders copied into every block
    for key in ("pos_embed.proj.weight", "proj_out_1.weight", "proj_out_2.bias",
                "transformer_blocks.1.attn1.to_v.weight", "transformer_blocks.0.ff.net.0.proj.weight",
                "transformer_blocks.1.ff.net.2.bias", "transformer_blocks.1.norm1.linear.weight",
                "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.weight",
                "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
                "transformer_blocks.0.attn1.to_out.0.bias"):
        assert key in dif, key
    assert torch.equal(dif["transformer_blocks.1.attn1.to_k.weight"], sd["blocks.1.attn.qkv.weight"][64:128])
    back = diffusers_to_dit(dif, num_layers=2)
    assert set(back) == set(sd) - {"pos_embed"}
    for k in back:
        assert torch.equal(back[k], sd[k]), k


def test_diffusers_folder_loads_into_model(tmp_path):
    import json

    from safetensors.torch import save_file
    model = small_model()
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    sd["pos_embed"] = model.pos_embed.detach().clone()
    save_file(dit_to_diffusers(sd, 2), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(num_layers=2, num_attention_heads=2, attention_head_dim=32,
                                                          sample_size=8, patch_size=2, in_channels=3)))
    loaded = load_diffusers_folder(str(tmp_path))
    fresh = small_model()
    load_model_state(fresh, loaded, "folder")
    for k, v in sd.items():
        assert torch.allclose(fresh.state_dict()[k], v), k


def test_find_model_train_checkpoint_uses_ema(tmp_path):
    model = small_model()
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {}, "args": {"lr": 1e-4}}, path)
    sd = find_model(str(path))
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])


def test_find_model_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        find_model(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        find_model(str(junk))
    good = tmp_path / "good.pt"
    torch.save(small_model().state_dict(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        find_model(str(trunc))


def test_shape_mismatch_names_first_key():
    sd = small_model().state_dict()
    other = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=12)
    with pytest.raises(UserError, match="y_embedder.embedding_table.weight has shape"):
        load_model_state(other, sd, "ckpt")


def test_offline_pretrained_name_is_one_line_error(tmp_path, monkeypatch):
    import download

    def no_network(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(download.torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as e:
        download.download_model("DiT-XL-2-256x256.pt", directory=str(tmp_path))
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())  # no partial file left


def _diffusers_folder(tmp_path, perturb_block=None):
    import json

    from safetensors.torch import save_file
    sd = {k: torch.randn(v.shape) for k, v in small_model().state_dict().items()}
    dif = dit_to_diffusers(sd, 2)
    if perturb_block is not None:  # a model fine-tuned in diffusers: its block copies drift apart
        dif[f"transformer_blocks.{perturb_block}.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3
    save_file(dif, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(num_layers=2, num_attention_heads=2, attention_head_dim=32,
                                                          sample_size=8, patch_size=2, in_channels=3)))
    return str(tmp_path)


def test_diffusers_folder_with_differing_embedder_copies_is_refused(tmp_path):
    folder = _diffusers_folder(tmp_path, perturb_block=1)
    with pytest.raises(UserError, match=r"per-block embedder copies differ \(transformer_blocks\.1\.norm1\.emb\."
                                        r"timestep_embedder\.linear_1\.bias vs block 0\).*refused"):
        load_diffusers_folder(folder)


def test_quantized_checkpoint_as_ckpt_points_to_path(tmp_path):
    (tmp_path / "quant_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a quantized checkpoint directory .*--path"):
        find_model(str(tmp_path))


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import download

    def offline(url, dst, progress=True):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = tmp_path / "pretrained_models"
    with pytest.raises(UserError, match="could not be downloaded"):
        download.download_model("DiT-XL-2-256x256.pt", str(target))
    assert not target.exists()
