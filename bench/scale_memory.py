"""bench/scale.py's memory model: a seeded random DiT, the peak memory of calibration projected from
quant/calibration/budget.py's formulas (FP model, the planned search state, activations), the probe's forward
passes that check the activation model, and the search state by part (python bench/scale.py --state-parts)."""
import gc
import ctypes
import json
import os
import shlex
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch
from config import calib_set
from models import DiT_models, get_2d_sincos_pos_embed
from quant.calibration.budget import GIB as BUDGET_GIB, by_memory, layer_state_parts, plan_groups, transient_bytes
from quant.calibration.budget import workspace_bytes
from quant.errors import UserError
from quant.calibration.feed import LoopShape
from quant.method.layers import BLOCK_LAYERS, quantizable_layers

GIB, MIB, F32 = 2 ** 30, 2 ** 20, 4
CALIB_ROWS = 32  # 16 calibration labels x 2 (classifier-free guidance)
PROJECT = {256: 32, 512: 64}  # image px -> latent side


def random_model(name, latent, seed):
    """DiT `name` on a latent x latent x 4 input, seeded; adaLN and the final layer N(0, 0.02) instead of zeros."""
    torch.manual_seed(seed)
    model = DiT_models[name](input_size=latent, in_channels=4, num_classes=1000)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaLN_modulation" in n or n.startswith("final_layer"):
                p.normal_(0, 0.02, generator=gen)
    return model.eval()


# ---------------------------------------------------------------- the memory model

def live_widths(D, H):
    """Float32 widths live at once per token row in one block forward (no grad): the peak, and at each quantized
    layer's input. Attention: the residual x, modulated h, qkv (3D), SDPA's output (its layout makes proj's input
    a view), proj's output: 7D. MLP: the block's input (its caller holds it), x after attention, h, fc1's and
    GELU's outputs: 3D + 2H. At fc2's input fc1's output is already freed."""
    return max(7 * D, 3 * D + 2 * H), {"attn.qkv": 2 * D, "attn.proj": 6 * D, "mlp.fc1": 3 * D, "mlp.fc2": 3 * D + H}


def meta_model(name, latent):
    with torch.device("meta"):
        return DiT_models[name](input_size=latent, in_channels=4, num_classes=1000)


def activation_bytes(model, rows, cfg=None, device_type="cpu"):
    """(bytes, where) of the activation working set at `rows` token rows (cfg None: an FP forward): the larger of one
    block forward's peak and, at each quantized layer's input, what is live there plus the search's per-step
    workspace for that layer (quant/calibration/budget.py's workspace_bytes, freed after the layer's step)."""
    shapes = {n: tuple(model.blocks[0].get_submodule(n).weight.shape) for n in BLOCK_LAYERS}
    peak, at = live_widths(shapes["attn.qkv"][1], shapes["mlp.fc1"][0])
    best, where = F32 * rows * peak, "block forward"
    for name in BLOCK_LAYERS if cfg is not None else ():
        ws = workspace_bytes(*shapes[name], rows, cfg, device_type)
        if F32 * rows * at[name] + ws > best:
            best, where = F32 * rows * at[name] + ws, f"{name} search"
    return best, where


def planned_state(model, cfg, device_type, loop, budget_bytes, chunks=1):
    """(device bytes, host bytes) of the largest layer group's search state that one QuantDiT process plans
    (quant/calibration/budget.py; tests/test_budget.py holds these formulas to the bytes held): the group's states plus
    one layer's transient candidates (the shortlist), on the device; its per-step ranges, on the host."""
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_layers(model).items()}
    groups, _ = plan_groups(shapes, cfg, budget_bytes, device_type, statistic_slots=chunks, loop=loop)
    transient = max(transient_bytes(o, i, cfg) for o, i in shapes.values())
    held = []
    for group in groups:
        mem = [by_memory(layer_state_parts(*shapes[n], cfg, device_type, chunks, loop), device_type) for n in group]
        held.append((transient + sum(m["device"] for m in mem), sum(m["host"] for m in mem)))
    return max(held)


def calib_batch(q):
    """(rows, chunks) of QuantDiT's calibration batch for its parsed flags q (config.calib_set: its defaults;
    ImageNet classes), rows = samples x 2 for guidance."""
    return 2 * len(calib_set(1000, q.calib_labels, q.calib_samples)), q.calib_chunks


def project(model_name, cfg, device_type, px, latent, steps, budget_bytes, chunks=1, rows=CALIB_ROWS):
    """One projected row: FP model, the planned search state (device, host), activations (one chunk's forward),
    the device's peak."""
    model = meta_model(model_name, latent)
    tokens = (latent // model.patch_size) ** 2
    loop = LoopShape(steps, rows // chunks, tokens)
    state, host = planned_state(model, cfg, device_type, loop, budget_bytes, chunks)
    act, where = activation_bytes(model, rows // chunks * tokens, cfg, device_type)
    fp = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"px": px, "tokens": tokens, "steps": steps, "model": fp, "state": state, "host": host,
            "activations": act, "where": where, "load": 2 * fp, "projected": fp + state + act}


def projection(args, runs, qargs, run_latent):
    """One row per scheme and size: model, planned state, activations, projected peak, load peak, and the run's
    measured peak in the same memory: torch.cuda.max_memory_allocated on CUDA, the peak RSS on the CPU."""
    rows = []
    for scheme, run in runs.items():
        cal = (run["report"] or {}).get("calibration") or {}
        cuda = str(cal.get("device", args.device)).startswith("cuda")
        q = qargs[scheme]
        for px, latent in [(args.image_size, run_latent), *PROJECT.items()]:
            rows_, chunks = calib_batch(q)
            row = project(args.model, quant_config(q), "cuda" if cuda else "cpu", px, latent, args.steps,
                          round(q.calib_memory_gb * BUDGET_GIB), chunks, rows_)
            here = latent == run_latent
            row.update(scheme=scheme, measured_as="CUDA max allocated" if cuda else "peak RSS",
                       measured=(cal.get("peak_cuda_bytes") if cuda else run["peak_rss_bytes"]) if here else None)
            rows.append(row)
    return rows


def quant_config(qargs):
    import QuantDiT
    return QuantDiT.quant_config_from_args(qargs)


# ---------------------------------------------------------------- the probe (a subprocess of bench/scale.py)

def _status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def probe_child(args):
    """Forward passes at batch 32: the rise of the peak RSS over the RSS before (first call, repeat) per tokens."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        raise UserError("the probe resets the peak RSS through /proc/self/clear_refs (Linux): pass --no-probe")
    torch.set_grad_enabled(False)
    threads.set_threads(args.threads)
    baseline, patch = _status_bytes("VmRSS"), int(args.model.rsplit("/", 1)[1])
    model = random_model(args.model, patch, args.seed)
    D = model.pos_embed.shape[-1]

    def forward(tokens):
        side = max(1, round(tokens ** 0.5))  # the weights do not depend on the tokens, the sin-cos embedding does
        model.pos_embed = torch.nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(D, side)).float()[None], False)
        x, t = torch.randn(CALIB_ROWS, 4, side * patch, side * patch), torch.randint(0, 1000, (CALIB_ROWS,))
        rises, t0 = [], time.perf_counter()
        for _ in range(2):
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = _status_bytes("VmRSS")
            model(x, t, t)
            rises.append(_status_bytes("VmHWM") - before)
        return {"tokens": side * side, "first_bytes": rises[0], "repeat_bytes": rises[1], "s": time.perf_counter() - t0}

    forward(1)  # warm-up: the libraries' one-time allocations
    out = {"baseline_rss_bytes": baseline, "full": [forward(n) for n in args.probe_full]}
    model.blocks = model.blocks[:1]
    out["block"] = [forward(n) for n in args.probe_block]
    with open(args.probe_child, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------- the search state by part (--state-parts)

def state_parts(model_name, cfg, device_type, loop=None):
    """{part: bytes} summed over the model's quantized layers (the ranges over an FP loop of shape `loop`)."""
    total = {}
    for lin in quantizable_layers(meta_model(model_name, 4)).values():  # shapes only
        for k, v in layer_state_parts(*lin.weight.shape, cfg, device_type, loop=loop).items():
            total[k] = total.get(k, 0) + v
    return total


def state_parts_lines(model_name, extra, steps, image_size):
    """The markdown of --state-parts: per part (kept candidates, round-to-nearest baselines, loss-engine operands,
    pass-1 statistics and their per-step activation ranges over a loop of `steps` steps at `image_size` px,
    batch 32) the bytes summed over every quantized layer, for the QuantConfig that `QuantDiT.py <extra>`
    builds, on CPU and CUDA, and the total's share in host memory (the ranges, on CUDA). tests/test_budget.py
    checks each formula against the bytes actually held."""
    import QuantDiT
    cfg = quant_config(QuantDiT.build_parser().parse_args(shlex.split(extra)))
    patch = int(model_name.rsplit("/", 1)[1])
    loop = LoopShape(steps, CALIB_ROWS, (image_size // 8 // patch) ** 2)
    rows = {d: state_parts(model_name, cfg, d, loop) for d in ("cpu", "cuda")}
    names = list(rows["cpu"])
    unit, size = ("GiB", GIB) if sum(rows["cpu"].values()) >= GIB else ("MiB", MIB)
    return [f"{model_name}, `QuantDiT.py {extra}`: scheme {cfg.scheme}, search {cfg.search}, {unit} (the ranges: "
            f"{steps} steps at {image_size} px, batch {CALIB_ROWS})", "",
            "| device | " + " | ".join(names) + " | total | of which host |", "|---|" + "---:|" * (len(names) + 2),
            *(f"| {d} | " + " | ".join(f"{p[n] / size:.3f}" for n in names) + f" | {sum(p.values()) / size:.3f} | "
              f"{by_memory(p, d)['host'] / size:.3f} |" for d, p in rows.items())]
