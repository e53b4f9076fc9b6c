"""The reference scheme's loss algebra (one weight for every alpha; all candidates of a row chunk at once), and the
row helpers both of the loss engine's fast paths use (quant/search/losses.py).

The residual is written as Y_q - Y_fp = E_k Weff^T + X D^T, E_k = fq(X/s_k) s_k - X (activation error),
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
run in bfloat16 (the cross term and the constants stay float32, the sums as in losses.py); losses move by
~1e-5 relative (tests/test_search.py, bench/calibration.py). In float32 (the default) the losses are
the direct evaluation's to float rounding: within ~2e-8 of a float64 evaluation on every layer kind,
closer than impl="naive" itself (tests/test_loss_exact.py holds them to 1e-6 of it). On x86 CPUs
with AVX512-BF16 that bf16 evaluation runs fused in C (quant.kernels.bf16_ref_losses,
quant/kernels/csrc/alpha_search_bf16.c).
"""
import torch

from quant import kernels
from quant.method import lapack
from quant.method.quantizer import affine_params

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def row_sq(t):
    """float64 (rows,): the squared norms of the rows of t (rows, w) float32 or bfloat16, each row summed in
    float32 and squared in float64 on t's device (no host sync). Sum them in float64: one float32 sum over
    many rows runs low (quant/search/losses.py's docstring)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).double().square()


def fake_quant_rows(t, ranges, r0, qmax, intervals):
    """t (..., n, in) = x/s for rows r0..r0+n -> in place codes - zero; returns (t, scale): fq = t * scale.
    ranges: (scale, qmax - zero) per candidate and row, or None (a range per row of t itself).

    quantizer.encode/decode compute fq = (clamp(round(t / scale) + zero, 0, qmax) - zero) * scale.
    The lower clamp never acts: t >= m (the group's min, the same float values) and round is
    monotone, so round(t / scale) >= round(m / scale) = -zero. Hence codes - zero =
    min(round(t / scale), qmax - zero), one pass instead of three.
    """
    n = t.shape[-2]
    if ranges is None:
        sc, zc = affine_params(t.amin(-1, keepdim=True), t.amax(-1, keepdim=True), intervals)
        top = qmax - zc
    else:
        sc, top = ranges[0][..., r0:r0 + n, None], ranges[1][..., r0:r0 + n, None]
    torch.minimum(t.div_(sc).round_(), top, out=t)
    return t, sc


def shared_operands(cands, matmul_dtype):
    """The per-layer constants of the algebra (the module docstring) from reference-scheme candidates:
    {m: M (in, W) in matmul_dtype, m_packed: its fused-kernel layout (where that runs), split: is the
    cross term expanded, xmul float32 (in, const_from + f): X @ xmul = [X N M^T or P, X F], const_from}."""
    w = cands.weight
    ops = {}
    weff = cands.effective(torch.float64)  # the exact weight: D = Weff - W has no float32 rounding of Q + L R
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
    mdt = MATMUL_DTYPES[matmul_dtype]
    ops["m"] = m.to(mdt).contiguous()
    packed = kernels.bf16_pack(m) if mdt == torch.bfloat16 else None
    if packed is not None:
        ops["m_packed"] = packed  # the fused CPU kernel's layout of the same bf16 values
    # cross term <E M, P> = <E, X (N M^T)>: worth it when M has at least as many columns as rows
    # (then X (N M^T) costs no more than P); otherwise P is added to E M (see shared_losses)
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
    return ops


def shared_losses(ops, x2, s, ranges, matmul_dtype, step):
    """Sum over rows of ||E_k M + P||^2 (+ const), all candidates per chunk of `step` rows (one shared M).

    ops: the engine's operands (shared_operands' with qmax and intervals); x2 (rows, in) float32; s (k, in);
    ranges: (scale, qmax - zero) (k, rows) each, or None. When M has at least as many columns as rows, this
    is ||E_k M||^2 + 2 <E_k, X N M^T> + ||X F||^2: the product's output is only squared and summed.
    Otherwise P is added to the (narrower) product E_k M before squaring. One product X [N M^T or N, F]
    per step feeds both. Returns float64 (k,) on x2's device.
    """
    rows, c = x2.shape
    k = s.shape[0]
    s3 = s.view(k, 1, c)
    mdt = MATMUL_DTYPES[matmul_dtype]
    split = ops["split"]
    xm = x2 @ ops["xmul"]  # float32: shared by every candidate
    partner = xm[:, :ops["const_from"]]  # X N M^T (split), or P = X N
    const = row_sq(xm[:, ops["const_from"]:]).sum()
    if "m_packed" in ops and ranges is not None:  # the same evaluation fused in C
        return kernels.bf16_ref_losses(x2, step, ops["m"].shape[1], ops["m_packed"], partner, split, s,
                                       ranges) + const
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
        t, sc = fake_quant_rows(torch.div(xc, s3, out=t), ranges, r0, ops["qmax"], ops["intervals"])
        e = torch.addcmul(neg_x[r0:r0 + n], t.mul_(sc), s3, out=t)
        if split:
            acc += 2 * torch.mv(e.view(k, -1), partner[r0:r0 + n].reshape(-1)).double()
        if ebuf is not None:  # only the candidate product runs in bfloat16
            e = ebuf[:k * n * c].view(k, n, c).copy_(e)
        z = torch.mm(e.view(k * n, c), ops["m"]).view(k, n, -1)
        if not split:
            z = torch.add(partner[r0:r0 + n], z) if ebuf is not None else z.add_(partner[r0:r0 + n])
        acc += row_sq(z.view(k * n, -1)).view(k, n).sum(1)
    return acc + const
