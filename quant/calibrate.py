"""Data-free calibration and quantization of a DiT (METHOD.md sections 2-5, 8).

Every statistic the method needs is a running max or sum over denoising steps, so it is
accumulated by forward pre-hooks while the full-precision model samples a fixed noise
batch; no step's activations are kept. Two FP sampling loops, whatever the depth:

    pass 1  TAS statistics: a_j = max over steps and rows of |X_t[:, j]| per layer
    pass 2  alpha search: every layer's candidates scored on every step's FP input

then every layer is replaced by a QuantLinear built for its chosen alpha. With
`quantize_adaln`, every block's adaLN linear is then quantized weight-only (8-bit, per
output channel, round-to-nearest; see quantize_adaln()).
"""
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from quant.qlinear import QuantLinear
from quant.quantizer import ActQuantConfig, WeightQuantConfig, dequantize_weight
from quant.search import MATMUL_DTYPES, AlphaSearch, alpha_grid
from quant.smoothing import RunningAbsMax

# The four linears of every block that DiTAS quantizes (METHOD.md section 1).
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# --quantize-adaln: weight-only quantization of every block's adaLN linear (Linear(D, 6D)).
ADALN_LAYER = "adaLN_modulation.1"
ADALN_WEIGHT_CFG = WeightQuantConfig(bits=8, group_size=None, scheme="ditas")  # per output channel, RTN


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a DiT: the explicit config object of quantize_dit()."""
    scheme: str = "ditas"
    weight_bit: int = 4
    act_bit: int = 8
    group_size: int | None = 128      # ditas: None = per output channel; ignored by reference
    act_granularity: str = "row"
    smoothing: str = "search"         # search | fixed | none
    alpha: float = 0.5                # for smoothing == "fixed"
    alpha_step: float = 0.05
    lora_rank: int = 32
    lora_iters: int = 10
    svd: str = "full"
    search_steps: int | None = None   # loss over the first N steps only (reference: 50)
    quantize_adaln: bool = False      # also quantize every block's adaLN linear, weight-only 8-bit
    search_dtype: str = "fp32"        # reference scheme: candidate products in fp32 or bf16 (quant/search.py)
    search: str = "exact"             # exact: pass 2 scores candidates; approx: predicted from pass 1 (approx_search.py)
    search_row_stride: int = 1        # exact search: score every N-th token row only (an approximation; 1 = all)

    def __post_init__(self):
        if self.search not in ("exact", "approx"):
            raise ValueError(f"search must be exact or approx, got {self.search!r}")
        if isinstance(self.search_row_stride, bool) or not isinstance(self.search_row_stride, int) \
                or self.search_row_stride < 1:
            raise ValueError(f"search row stride must be a positive integer, got {self.search_row_stride!r}")
        if self.search_row_stride != 1 and self.search != "exact":
            raise ValueError("the search row stride applies to the exact search only (--search exact)")
        if self.smoothing not in ("search", "fixed", "none"):
            raise ValueError(f"smoothing must be search, fixed or none, got {self.smoothing!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"the fixed alpha must be in [0, 1], got {self.alpha}")
        if self.search_dtype not in MATMUL_DTYPES:
            raise ValueError(f"search dtype must be one of {tuple(MATMUL_DTYPES)}, got {self.search_dtype!r}")
        if self.lora_rank < 0 or self.lora_iters < 1:
            raise ValueError(f"LoRA rank must be >= 0 and iterations >= 1, got {self.lora_rank}, {self.lora_iters}")
        self.weight_cfg()  # validates bits, scheme, group size
        self.act_cfg()

    def weight_cfg(self):
        return WeightQuantConfig(bits=self.weight_bit, group_size=self.group_size, scheme=self.scheme)

    def act_cfg(self):
        return ActQuantConfig(bits=self.act_bit, granularity=self.act_granularity, scheme=self.scheme)

    def alphas(self):
        if self.smoothing == "none":
            return [None]
        if self.smoothing == "fixed":
            return [self.alpha]
        return alpha_grid(self.alpha_step)

    def to_dict(self):
        return asdict(self)


def quantizable_layers(model):
    """{name: nn.Linear} of the four linears of every block, in block order (any depth)."""
    return {f"blocks.{i}.{n}": block.get_submodule(n) for i, block in enumerate(model.blocks) for n in BLOCK_LAYERS}


def adaln_layers(model):
    """{name: adaLN linear} of every block (not final_layer's: 2D x D, 0.4 % of DiT-XL/2's weights,
    and it modulates the FP output projection directly)."""
    return {f"blocks.{i}.{ADALN_LAYER}": block.get_submodule(ADALN_LAYER) for i, block in enumerate(model.blocks)}


@torch.no_grad()
def quantize_adaln(model):
    """Replace every block's adaLN linear by a weight-only QuantLinear (ADALN_WEIGHT_CFG: 8-bit, ditas
    scheme, one scale per output channel, round-to-nearest; no smoothing, no LoRA, float activations).

    Its input is SiLU(c), one vector per sample, so there is nothing to smooth or search; folding
    (quant/fold.py) rescales its output rows through the per-row scales exactly. Returns
    {name: {"weight_error", "weight_rel_error"}} (Frobenius norms).
    """
    report = {}
    for name, lin in adaln_layers(model).items():
        if isinstance(lin, QuantLinear):
            continue
        q = QuantLinear.from_float(lin, None, None, ADALN_WEIGHT_CFG, None, lora_rank=0)
        err = float(torch.linalg.matrix_norm(lin.weight.float() - dequantize_weight(q.qweight)))
        report[name] = {"weight_error": err,
                        "weight_rel_error": err / max(float(torch.linalg.matrix_norm(lin.weight.float())), 1e-30)}
        model.set_submodule(name, q.to(lin.weight.device))
    return report


def check_layers(layers, cfg):
    """Raise ValueError for a setting that does not fit some layer, before any work is done."""
    for name, lin in layers.items():
        out, inp = lin.weight.shape
        if cfg.scheme == "ditas" and cfg.group_size is not None and inp % cfg.group_size:
            raise ValueError(f"--group-size {cfg.group_size} does not divide the input width {inp} of {name}")
        if cfg.scheme == "reference" and out % 32:
            raise ValueError(f"the reference scheme needs output widths divisible by 32; {name} has {out}")
        if cfg.lora_rank > min(out, inp):
            raise ValueError(f"--lora-rank {cfg.lora_rank} exceeds min(in, out) = {min(out, inp)} of {name}")


def _pre_hooks(layers, fn):
    """Register fn(name, x) as a forward pre-hook on each layer (observing only); returns the handles."""
    def hook(name):
        def observe(module, inputs):
            fn(name, inputs[0])  # returning None leaves the input untouched
        return observe
    return [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]


def run_hooked(layers, fn, loop):
    """Run loop() with fn(name, x) observing every layer's input; hooks are always removed."""
    handles = _pre_hooks(layers, fn)
    try:
        with torch.no_grad():
            loop()
    finally:
        for h in handles:
            h.remove()


def collect_tas(layers, loop):
    """Pass 1: the temporal-aggregated channel max a_j of every layer's input."""
    stats = {name: RunningAbsMax() for name in layers}
    run_hooked(layers, lambda name, x: stats[name].update(x), loop)
    return {name: s.value for name, s in stats.items()}


def quantize_dit(model, cfg, loop, progress=True):
    """Calibrate on `loop` (a callable running one FP sampling loop of model) and swap in QuantLinears.

    Returns the report: per layer alpha, search losses, weight errors before/after LoRA,
    output errors (mean squared error per step, and plain round-to-nearest's for reference);
    and wall time per phase.
    """
    if cfg.search == "approx":  # one FP loop; losses predicted from its statistics (quant/approx_search.py)
        from quant.approx_search import quantize_dit_approx
        return quantize_dit_approx(model, cfg, loop, progress)
    layers = quantizable_layers(model)
    check_layers(layers, cfg)
    wcfg, acfg = cfg.weight_cfg(), cfg.act_cfg()
    timings = {}

    t0 = time.time()
    act_absmax = collect_tas(layers, loop) if cfg.smoothing != "none" else {n: None for n in layers}
    timings["tas_statistics_s"] = time.time() - t0

    t0 = time.time()
    alphas = cfg.alphas()
    searches, baselines = {}, {}
    for name, lin in tqdm(layers.items(), desc="preparing candidates", disable=not progress, leave=False):
        searches[name] = AlphaSearch(lin.weight, lin.bias, act_absmax[name], alphas, wcfg, acfg,
                                     lora_rank=cfg.lora_rank, lora_iters=cfg.lora_iters, svd=cfg.svd,
                                     max_steps=cfg.search_steps, matmul_dtype=cfg.search_dtype,
                                     row_stride=cfg.search_row_stride)
        # plain round-to-nearest on the same inputs: the "before smoothing, before LoRA" error
        baselines[name] = AlphaSearch(lin.weight, lin.bias, None, [None], wcfg, acfg, lora_rank=0,
                                      max_steps=cfg.search_steps, matmul_dtype=cfg.search_dtype,
                                      row_stride=cfg.search_row_stride)
    timings["prepare_candidates_s"] = time.time() - t0

    t0 = time.time()

    def observe(name, x):
        searches[name].update(x)
        baselines[name].update(x)

    run_hooked(layers, observe, loop)
    timings["alpha_search_s"] = time.time() - t0

    t0 = time.time()
    report = {}
    for name in layers:
        search = searches[name]
        best = search.best()
        steps = max(search.steps, 1)
        report[name] = {
            "alpha": best.alpha,
            "search_losses": {str(a): loss / steps for a, loss in zip(search.alphas, search.losses)},
            "weight_error_before_lora": best.weight_error_rtn,
            "weight_error_after_lora": best.weight_error_lora,
            "lora_errors": best.lora_errors,
            "output_error": search.losses[search.alphas.index(best.alpha)] / steps,
            "output_error_rtn": baselines[name].losses[0] / max(baselines[name].steps, 1),
            "search_steps": search.steps,
        }
        model.set_submodule(name, QuantLinear.from_search(best, acfg))
    timings["build_layers_s"] = time.time() - t0
    out = {"layers": report, "timings": timings}
    if cfg.quantize_adaln:
        t0 = time.time()
        out["adaln_layers"] = quantize_adaln(model)
        timings["quantize_adaln_s"] = time.time() - t0
    return out
