"""The calibration's memory budget (`--calib-memory-gb`, docs/METHOD.md §13): what the alpha search
holds per layer between steps, and the layer groups that fit.

The state of one layer (quant.search.candidates.Candidates, its round-to-nearest baseline and the loss
engine's operands) is known from its shape and the QuantConfig before anything is computed, so
the driver (quant/calibration/driver.py) plans groups first: consecutive layers whose states add up to at
most the budget. Each group is prepared and scored over its own FP sampling loop of the same
fixed noise (the FP trajectory is identical every time, so the result equals one pass), then its
state is freed. tests/test_budget.py checks every formula here against the bytes actually stored.

Per memory: the shortlist's and approximate search's per-step activation ranges (InputStats' StepStacks,
`range_bytes`: 2 x 32 x C floats per layer and step at the row granularity, ~58 MB a step for DiT-XL/2)
live in host memory, pinned when the model is on CUDA; every other part lives where the model does. On
the CPU the host is the device: the budget packs every part. On CUDA it packs the device's parts
(`device_bytes`) and the ranges are reported as host bytes (`by_memory`). The ranges depend on the FP
loop (steps, rows, tokens: quant.calibration.feed.LoopShape); an unknown loop (None) counts none.

Not in the budget: the FP model, the sampling loop's activations and the per-step workspace of
the layer being scored (`workspace_bytes`, freed after each layer's step); bench/scale.py adds
them up for DiT-XL/2.
"""
from quant import kernels
from quant.search.approx import DEFAULT_TOKEN_SAMPLES, STEP_BLOCK
from quant.search.losses import chunk_elements, kernel_fits, rows_per_block

GIB = 1 << 30
F32 = 4
HOST_PARTS = ("ranges",)  # the parts held in host memory on every device (quant/search/approx.py StepStack)


def _groups(inp, cfg):
    return 1 if cfg.group_size is None else inp // cfg.group_size


def _shared(cfg, n_alphas):
    """Does the loss engine use the reference scheme's shared-weight operands (LossEngine.shared)?"""
    return cfg.scheme == "reference" and n_alphas > 1 and cfg.search == "exact"


def candidate_bytes(out, inp, cfg, n_alphas=None, lora_rank=None):
    """Bytes a Candidates of an (out, in) layer stores (Candidates.nbytes())."""
    a = len(cfg.alphas()) if n_alphas is None else n_alphas
    r = cfg.lora_rank if lora_rank is None else lora_rank
    smooth = F32 * a * inp
    if cfg.scheme == "reference":  # one fit, 32-row column groups
        return smooth + out * inp + 2 * F32 * (out // 32) * inp + F32 * r * (out + inp)
    packed = cfg.weight_bit <= 4 and inp % 2 == 0
    codes = a * out * (inp // 2 if packed else inp)
    return smooth + codes + 2 * F32 * a * out * _groups(inp, cfg) + F32 * a * r * (out + inp)


def kernel_operand_bytes(out, inp, n_groups, lora_rank):
    """One candidate's weight operands of the fused CPU kernel (kernels.w4_candidate, with a bias and
    zero points: what a ditas layer has): packed codes, scales / group sums / zero points and the bias
    per 32-column block, the transposed LoRA factors."""
    npad = -out // 32 * -32
    return npad * inp // 2 + 3 * F32 * n_groups * npad + F32 * lora_rank * npad \
        + F32 * inp * (-lora_rank // 16 * -16) + F32 * npad


def engine_bytes(out, inp, cfg, n_alphas=None, device_type="cpu", lora_rank=None):
    """Bytes of the loss engine's operands (LossEngine.nbytes()) through the scoring: the shared-weight
    path's, or each candidate's fused-kernel operands (CPU, search_losses.kernel_fits)."""
    a = len(cfg.alphas()) if n_alphas is None else n_alphas
    if not _shared(cfg, a):
        scored = cfg.search != "approx" and device_type == "cpu"
        ng = _groups(inp, cfg)
        if scored and kernel_fits(cfg.scheme, cfg.weight_bit, cfg.act_bit, inp, ng):
            return a * kernel_operand_bytes(out, inp, ng, cfg.lora_rank if lora_rank is None else lora_rank)
        return 0
    bf16 = cfg.search_dtype == "bf16"
    m_cols = inp if inp < out else out                  # M = V S (in x in) or Weff^T (in x out)
    total = (2 if bf16 else F32) * inp * m_cols
    total += F32 * inp * (2 * inp if m_cols >= inp else out)  # xmul: [X N M^T, X F] or P = X N
    if bf16 and device_type == "cpu" and kernels.bf16_ok():
        total += 2 * (-inp // 2 * -2) * (-m_cols // 32 * -32)  # the fused kernel's packed copy of M
    return total


def statistic_bytes(out, inp, cfg):
    """Pass-1 statistic kept per layer: the TAS maximum (none for the exact search without smoothing), and
    the approximate search's X^T X (float64; float32 for the shortlist, which frees it once the layer's
    candidates are ranked); its per-step ranges are range_bytes."""
    if cfg.search in ("approx", "shortlist"):
        return F32 * inp + (8 if cfg.search == "approx" else F32) * inp * inp
    return 0 if cfg.smoothing == "none" else F32 * inp


def range_bytes(inp, cfg, loop):
    """Host bytes of one statistic slot's per-step activation ranges (InputStats' float32 StepStacks, whole
    blocks of STEP_BLOCK steps) over an FP loop of shape `loop` (per chunk): per kept step 2 C (tensor),
    2 rows C (row) or min(token_samples, rows tokens) C (token); 0 for the exact search or an unknown loop."""
    if cfg.search not in ("approx", "shortlist") or loop is None:
        return 0
    steps = loop.steps if cfg.search_steps is None else min(loop.steps, cfg.search_steps)
    per_step = {"tensor": 2, "row": 2 * loop.rows, "token": min(DEFAULT_TOKEN_SAMPLES, loop.rows * loop.tokens)}
    return F32 * inp * per_step[cfg.act_cfg().granularity] * -(-steps // STEP_BLOCK) * STEP_BLOCK


def kept_alphas(cfg):
    """Candidates per layer held through the scoring: the shortlist, or every alpha."""
    a = len(cfg.alphas())
    return min(a, cfg.search_shortlist) if cfg.search == "shortlist" else a


def layer_state_parts(out, inp, cfg, device_type="cpu", statistic_slots=1, loop=None):
    """{part: bytes} of what one layer's search holds between steps: the kept candidates, the round-to-nearest
    baseline, the loss engines' operands of both, the pass-1 statistic and its per-step ranges (one of each per
    chunk of the FP loop this process runs: quant/calibration/feed.py; the ranges of an FP loop of shape `loop`)."""
    kept = kept_alphas(cfg)
    return {"candidates": candidate_bytes(out, inp, cfg, n_alphas=kept),
            "baseline": candidate_bytes(out, inp, cfg, n_alphas=1, lora_rank=0),
            "operands": engine_bytes(out, inp, cfg, n_alphas=kept, device_type=device_type)
            + engine_bytes(out, inp, cfg, n_alphas=1, device_type=device_type, lora_rank=0),
            "statistic": statistic_slots * statistic_bytes(out, inp, cfg),
            "ranges": statistic_slots * range_bytes(inp, cfg, loop)}


def layer_state_bytes(out, inp, cfg, device_type="cpu", statistic_slots=1, loop=None):
    """Everything one layer's search holds between steps, host and device (the sum of layer_state_parts)."""
    return sum(layer_state_parts(out, inp, cfg, device_type, statistic_slots, loop).values())


def by_memory(parts, device_type):
    """{"device": bytes, "host": bytes} of {part: bytes}: on the CPU every part is the device's."""
    host = 0 if device_type == "cpu" else sum(v for k, v in parts.items() if k in HOST_PARTS)
    return {"device": sum(parts.values()) - host, "host": host}


def device_bytes(out, inp, cfg, device_type="cpu", statistic_slots=1, loop=None):
    """What one layer's search holds between steps in the device's memory (what the budget packs)."""
    return by_memory(layer_state_parts(out, inp, cfg, device_type, statistic_slots, loop), device_type)["device"]


def transient_bytes(out, inp, cfg):
    """The shortlist: one layer's candidates beyond the kept ones, held from their preparation to its ranking."""
    return candidate_bytes(out, inp, cfg) - candidate_bytes(out, inp, cfg, n_alphas=kept_alphas(cfg))


def workspace_bytes(out, inp, rows, cfg, device_type="cpu"):
    """Transient bytes while one step of one layer is scored on device_type (an estimate; freed after the
    layer's step; the row chunks and blocks are sized per device: search_losses.chunk_elements).

    Own-weight path (ditas, baselines): a dequantized candidate weight with its unpacked codes and two
    float temporaries, the FP output of a block of rows, one row chunk's input and output. Shared path
    (reference): -X, X @ xmul and a row chunk of every candidate's activation error.
    """
    step = min(rows, max(64, chunk_elements(device_type) // inp))
    block = min(rows, rows_per_block(out, inp, device_type))
    own = (3 * F32 + 1) * out * inp + F32 * block * out + F32 * step * (inp + out)
    a = len(cfg.alphas())
    if not _shared(cfg, a):
        return own
    m_cols = inp if inp < out else out
    xmul_cols = 2 * inp if m_cols >= inp else out
    chunk = max(16, chunk_elements(device_type) // (a * inp))
    return max(own, F32 * rows * (inp + xmul_cols) + 3 * F32 * a * min(chunk, rows) * max(inp, m_cols))


def human(nbytes):
    """'1.234 GiB' or '12.34 MiB'."""
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= GIB / 100 else f"{nbytes / 2 ** 20:.2f} MiB"


def layer_cost(out, inp, cfg):
    """A layer's relative calibration work, to share the layers among processes: its weight's size (the fits,
    the scoring) plus in x in where pass 1 sums X^T X (shortlist, approx): fc2's X^T X (in = 4 D) is 16x fc1's,
    which a share by weight size alone would not see."""
    return out * inp + (inp * inp if cfg.search != "exact" else 0)


def plan_groups(shapes, cfg, budget_bytes, device_type="cpu", holders=1, statistic_slots=1, loop=None):
    """(consecutive groups of layer names whose device states fit budget_bytes: [[name, ...], ...], {name: the
    layer's whole state, host and device: layer_state_bytes}).

    shapes: {name: (out, in)} in calibration order. budget_bytes None: one group. Raises ValueError
    naming the largest layer and the minimum budget when a single layer does not fit. holders: the
    processes that each hold every holder's groups of a round (the FP loops divided by chunks,
    quant/calibration/feed.py): each plans for budget / holders. statistic_slots: statistics per layer (the
    chunks this process runs). loop: the FP loop's shape per chunk (quant.calibration.feed.LoopShape; None: unknown, no
    ranges counted).
    """
    sizes = {name: layer_state_bytes(out, inp, cfg, device_type, statistic_slots, loop)
             for name, (out, inp) in shapes.items()}
    if budget_bytes is None or not sizes:
        return [list(shapes)], sizes
    device = {name: device_bytes(out, inp, cfg, device_type, statistic_slots, loop)
              for name, (out, inp) in shapes.items()}
    budget = budget_bytes / holders
    # a group's state plus one layer's transient candidates (the largest) must fit
    transient = max(transient_bytes(out, inp, cfg) for out, inp in shapes.values())
    largest = max(device, key=device.get)
    one = device[largest] + transient
    if one > budget:
        need = -(-one * holders * 100 // GIB) / 100  # GiB, rounded up to 0.01
        held = "" if holders == 1 else f" on each of the {holders} processes dividing the FP loops' chunks"
        raise ValueError(f"--calib-memory-gb {budget_bytes / GIB:.3g} is too small for {largest}, whose search state "
                         f"takes {human(one)}{held}: pass at least --calib-memory-gb {need:.2f}")
    groups, used = [[]], transient
    for name, size in device.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = transient
        groups[-1].append(name)
        used += size
    return groups, sizes
