"""The alpha search's loss engine: one calibration step's sum((Y_q,k - Y_fp)^2) / (rows out) per candidate.

Evaluating 21 candidates per step is the cost of calibration, so LossEngine avoids everything
that does not change the result beyond float rounding (impl="naive" keeps the direct evaluation,
one batched product per candidate stack, as a check and as the cost model of the released code's
search):
* dynamic activation ranges of x/s for tensor/row granularity come from the per-channel min/max of
  x: min_i fl(x_ij / s_j) = fl(min_i x_ij / s_j) for s_j > 0, so they are exact without
  materializing x/s first; the quantizer's lower clamp never acts (see _fake_quant), so
  codes - zero = min(round(x/s/scale), qmax - zero);
* rows are processed in chunks (cache-sized on the CPU, a bounded workspace on a GPU: chunk_elements)
  with in-place ops into reused buffers; every chunk's squared error is added to float64 sums on the
  tensors' device, no host sync per chunk (the search reads a layer's sums back once). Every sum of
  squares is taken per row in float32 and summed in float64 (`_row_sq`): one float32 sum over a step's
  rows ran low, by ~2e-5 of a loss on the bundled model and ~1e-4 at DiT-XL/2's shapes;
* reference scheme (one weight for every alpha; all candidates of a row chunk at once): the residual
  is written as Y_q - Y_fp = E_k Weff^T + X D^T, E_k = fq(X/s_k) s_k - X (activation error),
  D = Weff - W (weight error, alpha-independent; Weff formed in float64 from the stored codes, scales
  and factors), so P = X D^T is shared by every candidate. E_k uses the quantizer's own codes,
  round((x / s) / scale) (x * (1 / (s scale)) flips codes at .5 boundaries). When
  in < out (qkv, fc1), Weff = U S V^T gives ||E Weff^T + P||^2 = ||E V S + P U||^2 +
  ||P (I - U U^T)||^2: an (in x in) product per candidate instead of (in x out). With M the
  candidate matrix (V S, or Weff^T) and P' the matching P, a square or wide M is expanded as
  ||E M||^2 + 2 <E, P' M^T> + ||P'||^2: P' M^T = X (N M^T) is one product per step, and so is the
  constant ||P'||^2 (+ ||P (I - U U^T)||^2) = ||X F||^2 with F F^T = N N^T (+ H): each candidate
  costs its product, squared and summed, and one pass for the cross term (a tall M, fc2, adds P'
  to the narrow product instead). Forming the small error E first also avoids the cancellation of
  Y_q - Y_fp, which is what makes matmul_dtype="bf16" usable: only the candidate products E_k M
  run in bfloat16 (the cross term and the constants stay float32, the sums as above); losses move by
  ~1e-5 relative (tests/test_search.py, bench/calibration.py). In float32 (the default) the losses are
  the direct evaluation's to float rounding: within ~2e-8 of a float64 evaluation on every layer kind,
  closer than impl="naive" itself (tests/test_loss_exact.py holds them to 1e-6 of it). On x86 CPUs
  with AVX512-BF16 that bf16 evaluation runs fused in C (quant/ops_avx512.py, quant/csrc/alpha_search_bf16.c);
* ditas scheme (a weight per alpha), and any single candidate (the round-to-nearest baselines):
  every candidate is evaluated from its own codes (`_own_weight_losses`), against the FP layer's own
  output where the caller passes it (the calibration driver does: no FP product here), else Y_fp
  computed once per block of rows. On x86 CPUs with AVX512-VNNI a <= 4-bit candidate with 8-bit
  activations runs the fused integer linear IntLinear runs (quant/ops_avx512.py: u8 activation
  codes x the packed weight codes, exact int32 group sums and zero-point corrections, LoRA and bias
  in float) instead of the float32 product and, since Y_q is formed
  from exact integers, within ~1e-8 of a float64 evaluation (tests/test_search.py); each
  candidate's kernel operands (repacked codes, group sums, padded LoRA factors: about the size of
  its stored codes and LoRA) are built at its first step and kept for the search. Elsewhere its
  weight is dequantized once per step (per block of rows when a step has many), one (in x out)
  float32 product per candidate and row chunk. No dense weight is kept
  between steps (quant/budget.py counts what is).
"""
import torch

from quant import lapack, ops_avx512
from quant.quantizer import affine_params, dequantize_weight, fake_quantize_act, num_intervals

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


def _row_sq(t):
    """float64 (rows,): the squared norms of the rows of t (rows, w) float32 or bfloat16, each row summed in
    float32 and squared in float64 on t's device (no host sync). Sum them in float64: one float32 sum over
    many rows runs low (the module docstring)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).double().square()


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
        """Per-layer constants of the fast path (see the module docstring)."""
        if self.ops is not None:
            return self.ops
        c = self.c
        w = c.weight
        ops = {"qmax": 2 ** self.act_cfg.bits - 1, "intervals": num_intervals(self.act_cfg.bits, self.act_cfg.scheme)}
        if self.shared:
            weff = c.effective(torch.float64)  # the exact weight: D = Weff - W has no float32 rounding of Q + L R
            d = weff - w.double()
            out, inp = w.shape
            # project onto Weff's column space, (in x in) products per candidate
            if inp < out:
                u, sv, vh = lapack.svd(weff, full_matrices=False)
                m, n = vh.T * sv, d.T @ u
                d_perp = d - u @ (u.T @ d)
                h = d_perp.T @ d_perp
            else:
                m, n = weff.T, d.T
                h = None
            mdt = MATMUL_DTYPES[self.matmul_dtype]
            ops["m"] = m.to(mdt).contiguous()
            if mdt == torch.bfloat16 and m.device.type == "cpu" and ops_avx512.bf16_ok():
                ops["m_packed"] = ops_avx512.pack_bf16(m)  # the fused CPU kernel's layout of the same bf16 values
            # cross term <E M, P> = <E, X (N M^T)>: worth it when M has at least as many columns as rows
            # (then X (N M^T) costs no more than P); otherwise P is added to E M (see _reference_losses)
            ops["split"] = m.shape[1] >= m.shape[0]
            if ops["split"]:  # the constant ||P||^2 (+ ||P (I - U U^T)||^2) = <X^T X, N N^T (+ H)>
                h = n @ n.T if h is None else n @ n.T + h
            # constant = ||X F||^2 with H = F F^T: a sum of squares (a sum over X^T X * H would cancel)
            if h is not None:
                lam, vec = lapack.eigh(h)
                h = vec * lam.clamp(min=0).sqrt()
            parts = ([n @ m.to(mdt).double().T] if ops["split"] else [n]) + ([] if h is None else [h])
            ops["xmul"] = torch.cat(parts, 1).float().contiguous()  # X @ xmul = [X N M^T or P, X F]
            ops["const_from"] = parts[0].shape[1]
        self.ops = ops
        return ops

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
                acc = self._reference_losses(xr, s, ranges)
            else:
                acc = self._own_weight_losses(xr, s, ranges, sl, yr)
            loss[sl] += acc / (xr.shape[0] * self.c.weight.shape[0])

    def _fake_quant(self, t, ranges, r0):
        """t (..., n, in) = x/s for rows r0..r0+n -> in place codes - zero; returns (t, scale): fq = t * scale.

        quantizer.encode/decode compute fq = (clamp(round(t / scale) + zero, 0, qmax) - zero) * scale.
        The lower clamp never acts: t >= m (the group's min, the same float values) and round is
        monotone, so round(t / scale) >= round(m / scale) = -zero. Hence codes - zero =
        min(round(t / scale), qmax - zero), one pass instead of three.
        """
        n = t.shape[-2]
        if ranges is None:
            sc, zc = affine_params(t.amin(-1, keepdim=True), t.amax(-1, keepdim=True), self.ops["intervals"])
            top = self.ops["qmax"] - zc
        else:
            sc, top = ranges[0][..., r0:r0 + n, None], ranges[1][..., r0:r0 + n, None]
        torch.minimum(t.div_(sc).round_(), top, out=t)
        return t, sc

    def _reference_losses(self, x2, s, ranges):
        """Sum over rows of ||E_k M + P||^2 (+ const), all candidates per row chunk (one shared M).

        When M has at least as many columns as rows, this is ||E_k M||^2 + 2 <E_k, X N M^T> + ||X F||^2:
        the product's output is only squared and summed. Otherwise P is added to the (narrower)
        product E_k M before squaring. One product X [N M^T or N, F] per step feeds both.
        """
        ops = self.ops
        rows, c = x2.shape
        k = s.shape[0]
        s3 = s.view(k, 1, c)
        mdt = MATMUL_DTYPES[self.matmul_dtype]
        split = ops["split"]
        xm = x2 @ ops["xmul"]  # float32: shared by every candidate
        partner = xm[:, :ops["const_from"]]  # X N M^T (split), or P = X N
        const = _row_sq(xm[:, ops["const_from"]:]).sum()
        step = max(16, chunk_elements(x2.device.type) // (k * c))
        if "m_packed" in ops and ranges is not None:  # the same evaluation fused in C (quant/ops_avx512.py)
            x2 = x2.contiguous()
            acc = torch.zeros(k, dtype=torch.float64)
            for r0 in range(0, rows, step):
                acc += ops_avx512.ref_losses(x2[r0:r0 + step], r0, rows, ops["m"].shape[1], ops["m_packed"],
                                             partner[r0:r0 + step], split, s, ranges)
            return acc + const
        size = k * min(step, rows) * c
        neg_x = -x2
        buf = x2.new_empty(size)  # flat: the first k*n*c elements are a contiguous (k, n, c) for any n
        ebuf = None if mdt == torch.float32 else torch.empty(size, dtype=mdt, device=buf.device)
        acc = torch.zeros(k, dtype=torch.float64, device=x2.device)
        for r0 in range(0, rows, step):
            xc = x2[r0:r0 + step]
            n = xc.shape[0]
            t = buf[:k * n * c].view(k, n, c)
            # activation error fq(x/s) s - x from the quantizer's own codes, (x / s) / scale (x * (1 / (s scale))
            # flipped codes at .5 boundaries: up to ~5e-6 of a loss on the bundled model)
            t, sc = self._fake_quant(torch.div(xc, s3, out=t), ranges, r0)
            e = torch.addcmul(neg_x[r0:r0 + n], t.mul_(sc), s3, out=t)
            if split:
                acc += 2 * torch.mv(e.view(k, -1), partner[r0:r0 + n].reshape(-1)).double()
            if ebuf is not None:  # only the candidate product runs in bfloat16
                e = ebuf[:k * n * c].view(k, n, c).copy_(e)
            z = torch.mm(e.view(k * n, c), ops["m"]).view(k, n, -1)
            if not split:
                z = torch.add(partner[r0:r0 + n], z) if ebuf is not None else z.add_(partner[r0:r0 + n])
            acc += _row_sq(z.view(k * n, -1)).view(k, n).sum(1)
        return acc + const

    def _own_weight_losses(self, x2, s, ranges, sl, ref=None):
        """Sum over rows of ||fq(x/s_k) (Q_k + L_k R_k)^T - x W^T||^2 (svd_first: fq(x/s_k) Q_k^T + (x/s_k) (L_k R_k)^T,
        the branch fed the unquantized x/s_k, never on the fused kernel), one candidate at a time, each
        evaluated from its codes. ref: the layer's own output x W^T + b for these rows (the candidates
        then add the bias too), else x W^T is computed here per block of rows (one block unless the
        rows of a step are many). On the fused CPU kernel (`_kernel_sq`) a candidate is its integer
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
                    acc[j].add_(self._kernel_sq(xb, s[j], sx, zx, k, bias, y_fp))
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
                    t, sc = self._fake_quant(xs, rc, 0)
                    t = t.mul_(sc)
                    z = torch.mm(t, q.T) if bias is None else torch.addmm(bias, t, q.T)
                    if R.shape[0] and not fold:
                        z.addmm_(t @ R.T if low is None else low, L.T)
                    acc[j].add_(_row_sq(z.sub_(y_fp[r0:r0 + n])).sum())
                del q  # before the next candidate's weight is dequantized
        return acc

    def _kernel_ready(self, x2):
        """Can this step's candidates run on the fused CPU kernel (ditas_qgemm_w4, quant/ops_avx512.py)?
        CPU float32 rows of a layer `kernel_fits` (the fast path)."""
        c = self.c
        n_groups = c.scale.shape[-1] if c.scheme == "ditas" else 0
        return (self.impl == "fast" and x2.device.type == "cpu" and x2.dtype == torch.float32
                and c.lora_input == "quantized"  # the kernel feeds the LoRA branch the activation codes
                and kernel_fits(c.scheme, c.weight_cfg.bits, self.act_cfg.bits, c.weight.shape[1], n_groups))

    def _kernel_operands(self, k, bias):
        """(operands, int32 bound, group, rank) of candidate k on the fused kernel (with the bias or not).

        Candidate k's weight operands (w4_operands: unpacking, repacking and group sums, ~40 ms for a
        DiT-XL/2 fc1 against its integer GEMM of a few rows) are built at its first step and kept in
        kernel_ops until the engine goes (budget.kernel_operand_bytes counts them)."""
        key = k, bias is not None
        if key not in self.kernel_ops:
            qw = self.c.qweight(k)
            L, R = self.c.lora(k)
            ops, bound = ops_avx512.w4_operands(qw.codes, qw.scale, qw.zero, L, R, bias)
            self.kernel_ops[key] = ops, bound, self.c.weight.shape[1] // qw.scale.shape[-1], R.shape[0]
        return self.kernel_ops[key]

    def _kernel_plan(self, x2, s, ranges, sl, bias, block):
        """The fused kernel's part of one step: ([(scale, zero point) float32 (rows,) of each candidate's
        activation codes], [[does block b of rows fit its int32 bound (ops_avx512.fused_safe)] per candidate]).
        A block that does not is dequantized instead. The zero points' block maxima are read in one go."""
        rows = x2.shape[0]
        params, maxima = [], []
        for j in range(s.shape[0]):
            if ranges is None:  # per row of x2/s_j
                params.append(affine_params(*ops_avx512.rowrange(x2, s[j].contiguous()), self.ops["intervals"]))
            else:
                params.append((ranges[0][j], self.ops["qmax"] - ranges[1][j]))
            zx = params[-1][1]
            maxima.append(torch.stack([zx[b0:b0 + block].abs().amax() for b0 in range(0, rows, block)]))
        bounds = [self._kernel_operands(k, bias)[1] for k in range(sl.start, sl.stop)]
        maxima = torch.stack(maxima).tolist()  # (candidates, blocks): the step's one read
        safe = [[ops_avx512.fused_safe(bound, m) for m in row] for bound, row in zip(bounds, maxima)]
        return params, safe

    def _kernel_sq(self, xb, s, sx, zx, k, bias, y_fp):
        """||fq(xb/s) (Q_k + L_k R_k)^T (+ b) - y_fp||^2, float64 0-dim, on the fused kernel (the integer linear
        IntLinear runs: the same integers, float epilogue), for activation zero points within its int32 bound.

            xb      (n, in) float32 rows;  s (in,) the candidate's smoothing factors
            sx, zx  float32 (n,) each: the rows' activation scale and zero point (_kernel_plan)
            y_fp    (n, out) float32 reference rows (x W^T, or the layer's output with bias b)
        """
        ops, _, group, rank = self._kernel_operands(k, bias)
        s = s.contiguous()
        a, sa, lp = ops_avx512.encode(xb, s, sx, zx, self.ops["qmax"], group if "f_d" in ops else None,
                                      ops["f_Rt"] if rank else None)
        y = torch.empty_like(y_fp)
        ops_avx512.qgemm(a, ops["w_vnni4"], y.shape[1], group, ops["f_sw"], ops["f_cbd"], ops.get("f_d"), sa,
                         zx.to(torch.int32), sx, lp, rank, ops["f_Lt"], ops.get("f_bias"), y)
        return _row_sq(y.sub_(y_fp)).sum()


def kernel_fits(scheme, weight_bits, act_bits, inp, n_groups):
    """Does a layer's scoring run on the fused CPU kernel (ditas_qgemm_w4) where it loads: the ditas
    scheme's <= 4-bit grouped codes (groups a multiple of ALIGN_K4 wide), 8-bit activations?"""
    return (scheme == "ditas" and weight_bits <= 4 and act_bits == 8 and n_groups > 0
            and (inp // n_groups) % ops_avx512.ALIGN_K4 == 0 and ops_avx512.load() is not None)


def rows_per_block(out, inp, device_type="cpu"):
    """Rows of one step scored together by the own-weight path (a candidate's weight is dequantized once per
    block): the block's FP output (rows x out) stays within _BLOCK_ELEMENTS floats on the CPU,
    _DEVICE_BLOCK_ELEMENTS elsewhere."""
    elements = _BLOCK_ELEMENTS if device_type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, elements // max(out, inp))
