"""The alpha search's loss engine: one calibration step's sum((Y_q,k - Y_fp)^2) / (rows out) per candidate.

Evaluating 21 candidates per step is the cost of calibration, so LossEngine avoids everything
that does not change the result beyond float rounding (impl="naive" keeps the direct evaluation,
one batched product per candidate stack, as a check and as the cost model of the released code's
search):
* dynamic activation ranges of x/s for tensor/row granularity come from the per-channel min/max of
  x: min_i fl(x_ij / s_j) = fl(min_i x_ij / s_j) for s_j > 0, so they are exact without
  materializing x/s first; the quantizer's lower clamp never acts (see shared_weight.fake_quant_rows), so
  codes - zero = min(round(x/s/scale), qmax - zero);
* rows are processed in chunks (cache-sized on the CPU, a bounded workspace on a GPU: chunk_elements)
  with in-place ops into reused buffers; every chunk's squared error is added to float64 sums on the
  tensors' device, no host sync per chunk (the search reads a layer's sums back once). Every sum of
  squares is taken per row in float32 and summed in float64 (`row_sq`): one float32 sum over a step's
  rows ran low, by ~2e-5 of a loss on the bundled model and ~1e-4 at DiT-XL/2's shapes;
* reference scheme (one weight for every alpha; all candidates of a row chunk at once): the residual
  is split into an activation error E_k times one shared matrix plus a shared weight term
  (quant/search/shared_weight.py, which states the algebra and its accuracy); the fused bf16 evaluation in C
  where it runs (quant.kernels);
* ditas scheme (a weight per alpha), and any single candidate (the round-to-nearest baselines):
  every candidate is evaluated from its own codes (`_own_weight_losses`), against the FP layer's own
  output where the caller passes it (the calibration driver does: no FP product here), else Y_fp
  computed once per block of rows. On x86 CPUs with AVX512-VNNI a <= 4-bit candidate with 8-bit
  activations runs the fused integer linear IntLinear runs (quant.kernels.w4_residual: u8 activation
  codes x the packed weight codes, exact int32 group sums and zero-point corrections, LoRA and bias
  in float) instead of the float32 product and, since Y_q is formed
  from exact integers, within ~1e-8 of a float64 evaluation (tests/test_search.py); each
  candidate's kernel operands (repacked codes, group sums, padded LoRA factors: about the size of
  its stored codes and LoRA) are built at its first step and kept for the search. Elsewhere its
  weight is dequantized once per step (per block of rows when a step has many), one (in x out)
  float32 product per candidate and row chunk. No dense weight is kept
  between steps (quant/calibration/budget.py counts what is).
"""
import torch

from quant import kernels
from quant.method.quantizer import affine_params, dequantize_weight, fake_quantize_act, num_intervals
from quant.search.shared_weight import MATMUL_DTYPES, fake_quant_rows, row_sq, shared_operands, shared_losses
# Row chunks and blocks per device (chunk_elements, rows_per_block): cache-sized on the CPU; on a GPU a bounded
# workspace, so that a step of a layer is a few large launches instead of hundreds of small ones.
_CHUNK_ELEMENTS = 1 << 18  # CPU: candidates x rows x in per row chunk, ~1 MB of float32 (stays in L2)
_BLOCK_ELEMENTS = 1 << 22  # CPU: own-weight path, rows x out of a step's FP output at once (16 MB of float32)
_DEVICE_CHUNK_ELEMENTS = 1 << 24  # GPU: 64 MB of float32 per chunk buffer
_DEVICE_BLOCK_ELEMENTS = 1 << 26  # GPU: 256 MB of float32 FP output per block


def chunk_elements(device_type):
    """Elements of one row chunk's working buffer (candidates x rows x in; rows x in on the own-weight path)
    on a device type: _CHUNK_ELEMENTS on the CPU, _DEVICE_CHUNK_ELEMENTS elsewhere."""
    return _CHUNK_ELEMENTS if device_type == "cpu" else _DEVICE_CHUNK_ELEMENTS


def chunks(n, size):
    """Slices of range(n) of `size` (all of it for None)."""
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _range_groups(x, granularity):
    """Number of row groups of x (..., in) that share one dynamic range (quantizer._act_reduce_dims
    with one stacking dim): 1 for tensor, x.shape[0] for row, every row for token; None when the
    range must be taken per row from x/s itself (token, or row on a 2-D input)."""
    rows = x.numel() // x.shape[-1]
    if granularity == "tensor":
        return 1
    if granularity == "row" and x.dim() >= 3:
        return x.shape[0]
    if granularity == "row" and x.dim() == 1:
        return 1
    return None if rows > 1 else 1


class LossEngine:
    """Per-step losses of a Candidates' layers. act_cfg None leaves activations unquantized.

    chunk: candidates processed together (bounds memory). matmul_dtype: "fp32", or "bf16" for the
    reference scheme's candidate products. impl: "fast" (default) or "naive" (direct evaluation;
    same results up to float rounding). row_stride: score every row_stride-th row (token) of each
    step's input only, an approximation that divides the candidate work (the activation ranges
    still come from the whole input, so every scored row is quantized exactly as in the layer).
    """

    def __init__(self, act_cfg, chunk=None, matmul_dtype="fp32", impl="fast", row_stride=1):
        if matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {tuple(MATMUL_DTYPES)}, got {matmul_dtype!r}")
        if impl not in ("fast", "naive"):
            raise ValueError(f"impl must be 'fast' or 'naive', got {impl!r}")
        if isinstance(row_stride, bool) or not isinstance(row_stride, int) or row_stride < 1:
            raise ValueError(f"row_stride must be a positive integer, got {row_stride!r}")
        self.act_cfg, self.chunk, self.matmul_dtype, self.impl, self.row_stride = \
            act_cfg, chunk, matmul_dtype, impl, row_stride
        self.ops = None  # fast-path operands (reference: they replace the dense effective weight)
        self.kernel_ops = {}  # the fused CPU kernel's weight operands of each candidate, built at its first step
        self.c = None

    def attach(self, candidates):
        """Bind to the candidates; the shared-weight path (reference scheme, several alphas) builds its operands now."""
        self.c, self.kernel_ops = candidates, {}
        if self.shared:
            self._operands()
        return self

    @property
    def fast(self):
        return self.impl == "fast" and self.act_cfg is not None

    @property
    def shared(self):
        """The reference scheme's shared-weight algebra (one weight for every alpha); otherwise every
        candidate is evaluated from its own codes (_own_weight_losses)."""
        return self.fast and self.c.scheme == "reference" and len(self.c.alphas) > 1

    def nbytes(self):
        """Bytes of the operands kept between steps (the shared path's; the fused kernel's per candidate)."""
        held = [t for t in (self.ops or {}).values() if torch.is_tensor(t)]
        held += [t for ops, *_ in self.kernel_ops.values() for t in ops.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def losses(self, x, y=None):
        """float64 (n_alpha,): every candidate's mean squared output error on x (..., in) float32.

        y: the FP layer's own output on x (x W^T + b, float32 (..., out)), the reference the candidates
        are compared with where given (it saves the FP product); None computes x W^T."""
        loss = torch.zeros(len(self.c.alphas), dtype=torch.float64, device=x.device)
        (self._update_fast if self.fast else self._update_naive)(x, loss, y)
        return loss

    def _update_naive(self, x, loss, y=None):
        """Direct evaluation: y_k = fq(x/s_k) W_s,k^T per candidate, minus y_fp."""
        c = self.c
        y_fp = x.reshape(-1, x.shape[-1]) @ c.weight.T  # bias cancels in Y_q - Y_fp (y unused: the check path)
        for sl in chunks(len(c.alphas), self.chunk):
            s = c.smooth[sl]
            xs = x.unsqueeze(0) / s.view(s.shape[0], *[1] * (x.dim() - 1), s.shape[1])
            xq = xs if self.act_cfg is None else fake_quantize_act(xs, self.act_cfg, stack_dims=1)
            xq = xq.reshape(s.shape[0], -1, x.shape[-1])
            xs = xs.reshape(s.shape[0], -1, x.shape[-1])
            for j, k in enumerate(range(sl.start, sl.stop)):
                if c.lora_input == "smoothed":  # svd_first: the branch is fed x/s, unquantized
                    L, R = c.lora(k)
                    yq = xq[j] @ c.noisy_weight(k).T + (xs[j] @ R.T) @ L.T
                else:
                    yq = xq[j] @ c.smoothed_weight(k).T
                err = (yq - y_fp)[::self.row_stride]
                loss[k] += err.pow(2).mean().double()

    def _operands(self):
        """Per-layer constants of the fast path: the activation quantizer's, and the shared-weight algebra's
        (quant/search/shared_weight.py) where it applies."""
        if self.ops is None:
            self.ops = {"qmax": 2 ** self.act_cfg.bits - 1,
                        "intervals": num_intervals(self.act_cfg.bits, self.act_cfg.scheme)}
            if self.shared:
                self.ops.update(shared_operands(self.c, self.matmul_dtype))
        return self.ops

    def _ranges(self, x2, groups, s):
        """(scale, qmax - zero) per candidate and row, (k, rows), from per-group channel min/max of x."""
        rows, c = x2.shape
        xg = x2.view(groups, rows // groups, c)
        gmin, gmax = xg.amin(1), xg.amax(1)  # (groups, in)
        lo = torch.stack([(gmin / sk).amin(1) for sk in s])  # == min of x/s_k: division by s_k > 0 is monotone
        hi = torch.stack([(gmax / sk).amax(1) for sk in s])
        scale, zero = affine_params(lo, hi, self.ops["intervals"])
        rep = rows // groups
        return scale.repeat_interleave(rep, 1), (self.ops["qmax"] - zero).repeat_interleave(rep, 1)

    def _update_fast(self, x, loss, y=None):
        self._operands()
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        groups = _range_groups(x, self.act_cfg.granularity)
        stride = self.row_stride
        xr = x2[::stride].contiguous() if stride > 1 else x2  # the scored rows (ranges: from all of x)
        yr = None if y is None else y.reshape(-1, y.shape[-1])[::stride]
        for sl in chunks(len(self.c.alphas), self.chunk):
            s = self.c.smooth[sl]
            ranges = None if groups is None else self._ranges(x2, groups, s)
            if ranges is not None and stride > 1:
                ranges = tuple(r[:, ::stride].contiguous() for r in ranges)
            if self.shared:
                step = max(16, chunk_elements(xr.device.type) // (s.shape[0] * c))
                acc = shared_losses(self.ops, xr, s, ranges, self.matmul_dtype, step)
            else:
                acc = self._own_weight_losses(xr, s, ranges, sl, yr)
            loss[sl] += acc / (xr.shape[0] * self.c.weight.shape[0])

    def _own_weight_losses(self, x2, s, ranges, sl, ref=None):
        """Sum over rows of ||fq(x/s_k) (Q_k + L_k R_k)^T - x W^T||^2 (svd_first: fq(x/s_k) Q_k^T + (x/s_k) (L_k R_k)^T,
        the branch fed the unquantized x/s_k, never on the fused kernel), one candidate at a time, each
        evaluated from its codes. ref: the layer's own output x W^T + b for these rows (the candidates
        then add the bias too), else x W^T is computed here per block of rows (one block unless the
        rows of a step are many). On the fused CPU kernel (kernels.w4_residual) a candidate is its integer
        GEMM; otherwise Q_k is dequantized per block and the LoRA branch is added to it (out x in x r)
        when that costs less than applying it to the rows as two thin products (rows x (in + out) x r)."""
        rows, c = x2.shape
        cands = self.c
        out = cands.weight.shape[0]
        bias = None if ref is None else cands.bias
        step = max(64, chunk_elements(x2.device.type) // c)
        block = max(step, rows_per_block(out, c, x2.device.type))
        buf = x2.new_empty(min(step, rows), c)
        acc = torch.zeros(s.shape[0], dtype=torch.float64, device=x2.device)
        fused = self._kernel_plan(x2, s, ranges, sl, bias, block) if self._kernel_ready(x2) else None
        for b, b0 in enumerate(range(0, rows, block)):
            xb = x2[b0:b0 + block]
            y_fp = xb @ cands.weight.T if ref is None else ref[b0:b0 + block]
            fold = xb.shape[0] * (c + out) > out * c and cands.lora_input == "quantized"
            smoothed = cands.lora_input == "smoothed"  # svd_first: the branch is fed x/s, unquantized
            for j, k in enumerate(range(sl.start, sl.stop)):
                rk = None if ranges is None else (ranges[0][j, b0:b0 + block], ranges[1][j, b0:b0 + block])
                if fused is not None and fused[1][j][b]:
                    sx, zx = (t[b0:b0 + block] for t in fused[0][j])
                    res = kernels.w4_residual(xb, s[j], sx, zx, self._kernel_operands(k, bias), self.ops["qmax"], y_fp)
                    acc[j].add_(row_sq(res).sum())
                    continue
                q = dequantize_weight(cands.qweight(k)).to(x2.dtype)
                L, R = cands.lora(k)
                if fold and R.shape[0]:
                    q = q.addmm_(L, R)
                for r0 in range(0, xb.shape[0], step):
                    xc = xb[r0:r0 + step]
                    n = xc.shape[0]
                    rc = None if rk is None else (rk[0][r0:r0 + n], rk[1][r0:r0 + n])
                    xs = torch.div(xc, s[j], out=buf[:n])
                    low = xs @ R.T if smoothed and R.shape[0] else None  # before the quantizer overwrites xs
                    t, sc = fake_quant_rows(xs, rc, 0, self.ops["qmax"], self.ops["intervals"])
                    t = t.mul_(sc)
                    z = torch.mm(t, q.T) if bias is None else torch.addmm(bias, t, q.T)
                    if R.shape[0] and not fold:
                        z.addmm_(t @ R.T if low is None else low, L.T)
                    acc[j].add_(row_sq(z.sub_(y_fp[r0:r0 + n])).sum())
                del q  # before the next candidate's weight is dequantized
        return acc

    def _kernel_ready(self, x2):
        """Can this step's candidates run on the fused CPU kernel (quant.kernels.w4_residual)? CPU float32 rows
        of a layer `kernel_fits` (the fast path)."""
        c = self.c
        n_groups = c.scale.shape[-1] if c.scheme == "ditas" else 0
        return (self.impl == "fast" and x2.device.type == "cpu" and x2.dtype == torch.float32
                and c.lora_input == "quantized"  # the kernel feeds the LoRA branch the activation codes
                and kernel_fits(c.scheme, c.weight_cfg.bits, self.act_cfg.bits, c.weight.shape[1], n_groups))

    def _kernel_operands(self, k, bias):
        """quant.kernels.w4_candidate of candidate k (with the bias or not): its weight operands (unpacking,
        repacking and group sums, ~40 ms for a DiT-XL/2 fc1 against its integer GEMM of a few rows), built at
        its first step and kept in kernel_ops until the engine goes (budget.kernel_operand_bytes counts them)."""
        key = k, bias is not None
        if key not in self.kernel_ops:
            L, R = self.c.lora(k)
            self.kernel_ops[key] = kernels.w4_candidate(self.c.qweight(k), L, R, bias)
        return self.kernel_ops[key]

    def _kernel_plan(self, x2, s, ranges, sl, bias, block):
        """The fused kernel's part of one step: ([(scale, zero point) float32 (rows,) of each candidate's
        activation codes], [[does block b of rows fit its int32 bound (kernels.fused_safe)] per candidate]).
        A block that does not is dequantized instead. The zero points' block maxima are read in one go."""
        rows = x2.shape[0]
        params, maxima = [], []
        for j in range(s.shape[0]):
            if ranges is None:  # per row of x2/s_j
                params.append(affine_params(*kernels.rowrange(x2, s[j].contiguous()), self.ops["intervals"]))
            else:
                params.append((ranges[0][j], self.ops["qmax"] - ranges[1][j]))
            zx = params[-1][1]
            maxima.append(torch.stack([zx[b0:b0 + block].abs().amax() for b0 in range(0, rows, block)]))
        bounds = [self._kernel_operands(k, bias)[1] for k in range(sl.start, sl.stop)]
        maxima = torch.stack(maxima).tolist()  # (candidates, blocks): the step's one read
        safe = [[kernels.fused_safe(bound, m) for m in row] for bound, row in zip(bounds, maxima)]
        return params, safe


def kernel_fits(scheme, weight_bits, act_bits, inp, n_groups):
    """Does a layer's scoring run on the fused CPU kernel (quant.kernels.w4_fits) where it loads: the ditas
    scheme's <= 4-bit grouped codes, 8-bit activations?"""
    return scheme == "ditas" and kernels.w4_fits(weight_bits, act_bits, inp, n_groups)


def rows_per_block(out, inp, device_type="cpu"):
    """Rows of one step scored together by the own-weight path (a candidate's weight is dequantized once per
    block): the block's FP output (rows x out) stays within _BLOCK_ELEMENTS floats on the CPU,
    _DEVICE_BLOCK_ELEMENTS elsewhere."""
    elements = _BLOCK_ELEMENTS if device_type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, elements // max(out, inp))
