"""Find and load DiT weights: upstream names, local .pt/.safetensors files, diffusers folders.

Loading never unpickles code: `torch.load(..., weights_only=True)` or safetensors.
"""
import json
import os

import torch

from quant.errors import UserError
from quant.io.files import atomic_path

PRETRAINED_MODELS = {"DiT-XL-2-512x512.pt", "DiT-XL-2-256x256.pt"}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
PRETRAINED_DIR = "pretrained_models"


def download_model(model_name, directory=PRETRAINED_DIR):
    """Download an upstream DiT checkpoint to directory/model_name (once); one-line error offline."""
    path = os.path.join(directory, model_name)
    if os.path.isfile(path):
        return path
    url = PRETRAINED_URL.format(name=model_name)
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        with atomic_path(path, suffix=".part") as tmp:
            torch.hub.download_url_to_file(url, tmp, progress=True)
    except Exception as e:  # no network, DNS failure, HTTP error: all the same to the user
        if created and not os.listdir(directory):
            os.rmdir(directory)  # nothing left behind on the way to the error
        raise UserError(
            f"{model_name} is not in {directory}/ and could not be downloaded from {url} "
            f"({type(e).__name__}); download it there by hand and rerun"
        ) from None
    return path


def find_model(model_name):
    """Return a DiT state dict (upstream key names, float tensors) for a name or path."""
    if model_name in PRETRAINED_MODELS:
        return _load_file(download_model(model_name))
    if os.path.isdir(model_name):
        from quant.io.checkpoint import is_quantized_checkpoint
        if is_quantized_checkpoint(model_name):
            raise UserError(f"--ckpt {model_name} is a quantized checkpoint directory (QuantDiT.py's output), not an "
                            f"FP DiT checkpoint: sample it with sample.py or sample_merge_TAS.py --path {model_name}")
        return load_diffusers_folder(model_name)
    if not os.path.isfile(model_name):
        raise UserError(f"checkpoint {model_name} not found (expected a file, a diffusers folder, "
                        f"or one of {sorted(PRETRAINED_MODELS)})")
    return _load_file(model_name)


def _load_file(path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # a bundled/train.py checkpoint: sample from the EMA weights, as upstream
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a DiT state dict")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def load_model_state(model, state_dict, source):
    """Strict load with a one-line error naming the first missing, unexpected or mismatching key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        raise UserError(f"{source} does not fit this model: missing key {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise UserError(f"{source} does not fit this model: unexpected key {unexpected[0]}")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UserError(f"{source} does not fit this model: {k} has shape {tuple(state_dict[k].shape)}, "
                            f"the model expects {tuple(v.shape)} (wrong --model, --image-size or --num-classes?)")
    model.load_state_dict(state_dict, strict=True)


#################################################################################
#                 diffusers DiTTransformer2DModel <-> upstream keys              #
#################################################################################

def diffusers_to_dit(state, num_layers):
    """Map a diffusers DiTTransformer2DModel state dict to upstream DiT keys.

    diffusers copies the timestep and class embedders into every block's norm; upstream DiT has one
    embedder, so the copies must be equal (a model converted from upstream) and block 0's is taken.
    Copies that differ (a model fine-tuned in diffusers) have no exact upstream form: refused.
    `pos_embed` is not stored by diffusers (it is fixed sin-cos): the caller fills it from the
    model's own init.

    Note that diffusers' own DiTTransformer2DModel computes a different function on the same weights
    (LayerNorm eps 1e-5 instead of upstream's 1e-6, timestep frequencies with downscale_freq_shift=1
    instead of 0; docs/METHOD.md §12): loaded here, the weights compute upstream DiT's function.
    """
    out = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"],
        "final_layer.linear.bias": state["proj_out_2.bias"],
    }
    emb = "transformer_blocks.0.norm1.emb."
    for i, j in ((0, 1), (2, 2)):
        for p in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{p}"] = state[f"{emb}timestep_embedder.linear_{j}.{p}"]
    out["y_embedder.embedding_table.weight"] = state[f"{emb}class_embedder.embedding_table.weight"]
    copies = [k for k in state if k.startswith("transformer_blocks.") and ".norm1.emb." in k]
    for key in copies:
        first = emb + key.split(".norm1.emb.", 1)[1]
        if not torch.equal(state[key], state[first]):
            raise ValueError(f"its per-block embedder copies differ ({key} vs block 0): fine-tuned in diffusers, it "
                             f"has no exact upstream DiT form (one timestep/class embedder); refused")
    for d in range(num_layers):
        src, dst = f"transformer_blocks.{d}.", f"blocks.{d}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([state[f"{src}attn1.to_{n}.{p}"] for n in "qkv"], dim=0)
            out[f"{dst}attn.proj.{p}"] = state[f"{src}attn1.to_out.0.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = state[f"{src}ff.net.0.proj.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = state[f"{src}ff.net.2.{p}"]
            out[f"{dst}adaLN_modulation.1.{p}"] = state[f"{src}norm1.linear.{p}"]
    return out


def dit_to_diffusers(state, num_layers):
    """The inverse of diffusers_to_dit (pos_embed dropped, embedders copied into every block)."""
    out = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for d in range(num_layers):
        src, dst = f"blocks.{d}.", f"transformer_blocks.{d}."
        emb = f"{dst}norm1.emb."
        for i, j in ((0, 1), (2, 2)):
            for p in ("weight", "bias"):
                out[f"{emb}timestep_embedder.linear_{j}.{p}"] = state[f"t_embedder.mlp.{i}.{p}"].clone()
        out[f"{emb}class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"].clone()
        for p in ("weight", "bias"):
            q, k, v = (t.clone() for t in state[f"{src}attn.qkv.{p}"].chunk(3, dim=0))
            out[f"{dst}attn1.to_q.{p}"], out[f"{dst}attn1.to_k.{p}"], out[f"{dst}attn1.to_v.{p}"] = q, k, v
            out[f"{dst}attn1.to_out.0.{p}"] = state[f"{src}attn.proj.{p}"]
            out[f"{dst}ff.net.0.proj.{p}"] = state[f"{src}mlp.fc1.{p}"]
            out[f"{dst}ff.net.2.{p}"] = state[f"{src}mlp.fc2.{p}"]
            out[f"{dst}norm1.linear.{p}"] = state[f"{src}adaLN_modulation.1.{p}"]
    return out


def load_diffusers_folder(folder):
    """Load a local diffusers DiTTransformer2DModel folder (config.json + weights) as upstream keys."""
    from models import get_2d_sincos_pos_embed
    if os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")  # a whole DiTPipeline folder
    cfg_path = os.path.join(folder, "config.json")
    weights = [os.path.join(folder, f) for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not os.path.isfile(cfg_path) or not weights:
        raise UserError(f"{folder} is not a diffusers DiTTransformer2DModel folder "
                        f"(needs config.json and diffusion_pytorch_model.safetensors)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    state = _load_file(weights[0])
    try:
        out = diffusers_to_dit(state, cfg["num_layers"])
    except KeyError as e:
        raise UserError(f"{folder}: diffusers weights lack key {e.args[0]}") from None
    except ValueError as e:
        raise UserError(f"{folder}: {e}") from None
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    grid = cfg["sample_size"] // cfg["patch_size"]
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().unsqueeze(0)
    return out
