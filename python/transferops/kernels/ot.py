"""Triton kernels of the OT hot path: Sinkhorn's half-steps, its values and its gradients, each
streamed over tiles of the costs, which are recomputed from the points (never stored: memory
O((N + M) d)) or read from a given cost matrix. transferops._ot_sweeps' solver loop drives them
(transferops.ot registers it as the "triton" backend; see that module for the equations).

One kernel, ``_sweep``, serves every pass. For a block of rows i of one problem it streams the
columns j in tiles and forms the log-weight

    w_ij = r_i + h_j + c x_i . y_j - T[lx_i, ly_j] / eps    (points, c = 2 s / eps)
    w_ij = r_i + h_j - C_ij / eps                           (a cost matrix)

then reduces it: as an online log-sum-exp over j (LSE: a running max and sum per row, the online
softmax of FlashAttention), as the primal values' row sums (VALUES), or as sum_j exp(w_ij) y_j
(APPLY: the plan applied to the other cloud, for the gradients). With s |x|^2 and s |y|^2 moved
into r and h, the inner loop of a point-cloud tile is one tl.dot and a few FLOPs per pair. The
column half-step is the same kernel on the transposed problem (x and y swapped, the label
table's or the matrix's strides swapped). Problems of a batch share one launch; a problem that
has converged is skipped (its programs' column loop is empty), so each stops on its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ot_sweeps import solve
from ..ot import _Points, _progress_printer

LSE, VALUES, APPLY = 0, 1, 2


@triton.jit
def _tile_dot(x, y, b, rows, cols, rmask, cmask, D, sxb, sxn, sxd, syb, syn, syd,
              acc_t: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # x_i . y_j for a [BLOCK_N, BLOCK_M] tile, over D in chunks of BLOCK_D (zero-padded). 16-bit
    # tiles go to tl.dot as they are (exact products, float32 sums), except in the interpreter,
    # whose dot multiplies bf16's stored words as integers: there they are widened first.
    dot = tl.zeros([BLOCK_N, BLOCK_M], acc_t)
    for k in range(0, D, BLOCK_D):
        d = k + tl.arange(0, BLOCK_D)
        xk = tl.load(x + b * sxb + rows[:, None] * sxn + d[None, :] * sxd, mask=rmask[:, None] & (d < D)[None, :],
                     other=0.0)
        yk = tl.load(y + b * syb + cols[:, None] * syn + d[None, :] * syd, mask=cmask[:, None] & (d < D)[None, :],
                     other=0.0)
        if UPCAST:
            xk, yk = xk.to(acc_t), yk.to(acc_t)
        dot += tl.dot(xk, tl.trans(yk), input_precision=PREC, out_dtype=acc_t)
    return dot


@triton.jit
def _entropy_term(z, ez):
    # h(z) = z e^z - e^z + 1, by its series near 0 where the closed form cancels (_ot_limit).
    series = z * z * (0.5 + z * (1 / 3 + z * (1 / 8 + z * (1 / 30 + z * (1 / 144 + z * (1 / 840 + z * (
        1 / 5760 + z / 45360)))))))
    return tl.where(tl.abs(z) <= 1 / 32, series, (z * ez - ez) + 1)


@triton.jit
def _sweep(x, y, cmat, r0, r1, r2, h0, h1, h2, lx, ly, table, out, out2, active,
           N, M, D, sxb, sxn, sxd, syb, syn, syd, scb, scn, scm, stn, stm, consts,
           MODE: tl.constexpr, MATRIX: tl.constexpr, LABELS: tl.constexpr, ACC64: tl.constexpr,
           PREC: tl.constexpr, SUM_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Row vectors r* are [B, N] and column vectors h* [B, M], contiguous. LSE: out[b, i] =
    # log sum_j exp(w_ij), r0 = r, h0 = h. VALUES: r0, r1, r2 = f, log a, |x|^2 (points) and
    # h0, h1, h2 = g, log b, |y|^2: out = sum_j P_ij C_ij, out2 = sum_j a_i b_j h(z_ij).
    # APPLY: out[b, i, :] = sum_j exp(w_ij) y_j (dims of program axis 2), out2 = sum_j exp(w_ij).
    acc_t: tl.constexpr = tl.float64 if ACC64 else tl.float32
    b = tl.program_id(1).to(tl.int64)
    # consts: c = 2 s / eps, s, 1 / eps in acc_t (float scalar arguments would pass as float32)
    c = tl.load(consts)
    scale = tl.load(consts + 1)
    inv_eps = tl.load(consts + 2)
    # int64 indices: rows * stride passes 2^31 on matrices from 46k x 46k
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    live = tl.load(active + b) != 0
    rmask = rows < tl.where(live, N, 0)
    m_end = tl.where(live, M, 0)  # a converged problem's programs skip the loop
    r = tl.load(r0 + b * N + rows, mask=rmask, other=0.0).to(acc_t)
    if MODE == 1:
        la = tl.load(r1 + b * N + rows, mask=rmask, other=-float("inf")).to(acc_t)
        xn = tl.load(r2 + b * N + rows, mask=rmask, other=0.0).to(acc_t)
    if LABELS:
        lxi = tl.load(lx + rows, mask=rmask, other=0).to(tl.int64)
    m = tl.full([BLOCK_N], -float("inf"), acc_t)
    s = tl.zeros([BLOCK_N], acc_t)
    s2 = tl.zeros([BLOCK_N], acc_t)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    for j0 in range(0, m_end, BLOCK_M):
        cols = (j0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cmask = cols < M
        pair = rmask[:, None] & cmask[None, :]
        if MATRIX:
            cost = tl.load(cmat + b * scb + rows[:, None] * scn + cols[None, :] * scm, mask=pair, other=0.0).to(acc_t)
        else:
            dot = _tile_dot(x, y, b, rows, cols, rmask, cmask, D, sxb, sxn, sxd, syb, syn, syd, acc_t, PREC,
                            UPCAST, BLOCK_N, BLOCK_M, BLOCK_D)
        if LABELS:
            lyj = tl.load(ly + cols, mask=cmask, other=0).to(tl.int64)
            label = tl.load(table + lxi[:, None] * stn + lyj[None, :] * stm, mask=pair, other=0.0).to(acc_t)
        if MODE == 1:
            g = tl.load(h0 + b * M + cols, mask=cmask, other=0.0).to(acc_t)
            lb = tl.load(h1 + b * M + cols, mask=cmask, other=-float("inf")).to(acc_t)
            if not MATRIX:
                yn = tl.load(h2 + b * M + cols, mask=cmask, other=0.0).to(acc_t)
                cost = scale * tl.maximum(xn[:, None] + yn[None, :] - 2 * dot, 0.0)
                if LABELS:
                    cost += label
            z = (r[:, None] + g[None, :] - cost) * inv_eps
            lab = la[:, None] + lb[None, :]
            ez = tl.exp(z)
            ab = tl.exp(lab)
            s += tl.sum(tl.where(pair, ab * ez * cost, 0.0), axis=1)
            s2 += tl.sum(tl.where(pair & (ab > 0), ab * _entropy_term(z, ez), 0.0), axis=1)
        else:
            h = tl.load(h0 + b * M + cols, mask=cmask, other=-float("inf")).to(acc_t)
            if MATRIX:
                w = r[:, None] + h[None, :] - cost * inv_eps
            else:
                w = r[:, None] + h[None, :] + c * dot
                if LABELS:
                    w -= label * inv_eps
            w = tl.where(pair, w, -float("inf"))
            m_new = tl.maximum(m, tl.max(w, axis=1))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(w - shift[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if MODE == 2:
                yo = tl.load(y + b * syb + cols[:, None] * syn + dims[None, :] * syd,
                             mask=cmask[:, None] & (dims < D)[None, :], other=0.0).to(acc_t)
                acc = acc * alpha[:, None] + tl.dot(p, yo, input_precision=SUM_PREC, out_dtype=acc_t)
            m = m_new
    if MODE == 0:
        tl.store(out + b * N + rows, m + tl.log(tl.where(rmask, s, 1.0)), mask=rmask)
    elif MODE == 1:
        tl.store(out + b * N + rows, s, mask=rmask)
        tl.store(out2 + b * N + rows, s2, mask=rmask)
    else:
        top = tl.exp(m)
        tl.store(out + (b * N + rows[:, None]) * D + dims[None, :], acc * top[:, None],
                 mask=rmask[:, None] & (dims < D)[None, :])
        first = rows < tl.where(live & (tl.program_id(2) == 0), N, 0)  # one program per row writes the sums
        tl.store(out2 + b * N + rows, s * top, mask=first)


class Sweeps:
    """The launches of one problem set: point clouds x [B, N, d], y [B, M, d] with cost
    ``scale`` |x - y|^2 (+ ``labels`` = (lx [N], ly [M], table) for one problem), or a cost
    matrix C [B, N, M]; ``acc`` the dtype of the sums and potentials (float64 for float64
    inputs, else float32). Every method takes and returns contiguous tensors in ``acc``;
    ``transposed`` launches the column side."""

    def __init__(self, *, x=None, y=None, scale=1.0, labels=None, C=None, acc=torch.float32):
        self.x, self.y, self.scale, self.labels, self.C, self.acc = x, y, scale, labels, C, acc
        like = C if C is not None else x
        self.device = like.device
        self.B = like.shape[0]
        self.N, self.M = (C.shape[1], C.shape[2]) if C is not None else (x.shape[1], y.shape[1])
        self.D = 0
        if C is None:
            self.D = x.shape[2]
            self.xn = (x.to(acc) ** 2).sum(-1)
            self.yn = (y.to(acc) ** 2).sum(-1)
            self.scaled = (scale * self.xn, scale * self.yn)
        interpreted = self.device.type == "cpu"
        # Tiles: 64 x 64 pairs on a GPU (registers for the [BLOCK_N, BLOCK_M] log-weights); the
        # interpreter runs numpy per program, so larger tiles are faster there.
        self.block = 32 if interpreted else 64
        # float64 tiles 128 wide would take 256 KiB of shared memory for the pipelined loads of
        # x and y (ptxas, sm_90a), past the H100's 227 KiB per block: no launch for d > 64; 32
        # wide ones take 64 KiB and spill least.
        cap = 32 if acc == torch.float64 else 128
        self.block_d = max(16, min(cap, triton.next_power_of_2(max(self.D, 1))))
        dtype = like.dtype
        # float32 dots as three TF32 products (float32's accuracy on tensor cores; one TF32 product
        # would leave 1e-3 relative errors in x.y, and in the costs cancelling from it)
        self.prec = "tf32x3" if dtype == torch.float32 else ("ieee" if dtype == torch.float64 else None)
        self.upcast = interpreted and dtype in (torch.bfloat16, torch.float16)
        self._dummy = torch.zeros(1, dtype=acc, device=self.device)
        self._idummy = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._by_eps = {}

    def _launch(self, mode, transposed, rvecs, hvecs, out, out2, active, eps):
        N, M = (self.M, self.N) if transposed else (self.N, self.M)
        x, y = (self.y, self.x) if transposed else (self.x, self.y)
        rvecs = list(rvecs) + [self._dummy] * (3 - len(rvecs))
        hvecs = list(hvecs) + [self._dummy] * (3 - len(hvecs))
        if self.C is not None:
            C = self.C
            scb, scn, scm = (C.stride(0), C.stride(2), C.stride(1)) if transposed else C.stride()
            x = y = C
            sx = sy = (0, 0, 0)
            cmat = C
        else:
            sx, sy, cmat, (scb, scn, scm) = x.stride(), y.stride(), self._dummy, (0, 0, 0)
        if self.labels is not None:
            lx, ly, T = self.labels
            lx, ly = (ly, lx) if transposed else (lx, ly)
            stn, stm = (T.stride(1), T.stride(0)) if transposed else T.stride()
        else:
            lx = ly = self._idummy
            T, stn, stm = self._dummy, 0, 0
        grid = (triton.cdiv(N, self.block), self.B, triton.cdiv(self.D, self.block_d) if mode == APPLY else 1)
        _sweep[grid](x, y, cmat, *rvecs, *hvecs, lx, ly, T, out, out2 if out2 is not None else self._dummy, active,
                     N, M, self.D, *sx, *sy, scb, scn, scm, stn, stm, self._consts(eps),
                     MODE=mode, MATRIX=self.C is not None, LABELS=self.labels is not None,
                     ACC64=self.acc == torch.float64, PREC=self.prec, UPCAST=self.upcast,
                     SUM_PREC="ieee" if self.acc == torch.float64 else "tf32x3", BLOCK_N=self.block, BLOCK_M=self.block,
                     BLOCK_D=self.block_d)

    def _consts(self, eps: float) -> torch.Tensor:
        """[2 s / eps, s, 1 / eps] on the device in the sums' dtype, made once per eps."""
        if eps not in self._by_eps:
            self._by_eps[eps] = torch.tensor([2 * self.scale / eps, self.scale, 1 / eps], dtype=self.acc,
                                             device=self.device)
        return self._by_eps[eps]

    def norms(self, transposed: bool):
        """s |x_i|^2 of the side whose rows are swept, s |y_j|^2 of the other (0 for a matrix)."""
        if self.C is not None:
            return 0.0, 0.0
        return self.scaled[::-1] if transposed else self.scaled

    def lse(self, pot, log_w, eps, active, transposed=False):
        """log sum_j w_j exp((pot_j - C_ij) / eps) for every row i of the swept side, given the
        other side's potential ``pot`` and log-weights ``log_w``."""
        rn, cn = self.norms(transposed)
        n = self.M if transposed else self.N
        out = torch.empty(self.B, n, dtype=self.acc, device=self.device)
        r = -rn / eps if torch.is_tensor(rn) else torch.zeros(self.B, n, dtype=self.acc, device=self.device)
        self._launch(LSE, transposed, [r], [(log_w + (pot - cn) / eps).contiguous()], out, None, active, eps)
        return out

    def values(self, f, g, la, lb, eps, active):
        """Per problem sum_ij P_ij C_ij and sum_ij a_i b_j h((f_i + g_j - C_ij) / eps)."""
        rows = torch.empty(self.B, self.N, dtype=self.acc, device=self.device)
        ent = torch.empty_like(rows)
        rvecs, hvecs = [f, la], [g, lb]
        if self.C is None:
            rvecs.append(self.xn)
            hvecs.append(self.yn)
        self._launch(VALUES, False, [v.contiguous() for v in rvecs], [v.contiguous() for v in hvecs], rows, ent,
                     active, eps)
        return rows.sum(-1), ent.sum(-1)

    def apply(self, f, g, log_w, eps, active, transposed=False):
        """(sum_j w_j E_ij y_j [B, n, d], sum_j w_j E_ij [B, n]) with E_ij = exp((f_i + g_j -
        C_ij) / eps), rows i of the swept side (f its potential), ``log_w`` the other side's."""
        rn, cn = self.norms(transposed)
        n = self.M if transposed else self.N
        out = torch.empty(self.B, n, self.D, dtype=self.acc, device=self.device)
        sums = torch.empty(self.B, n, dtype=self.acc, device=self.device)
        self._launch(APPLY, transposed, [((f - rn) / eps).contiguous()], [(log_w + (g - cn) / eps).contiguous()],
                     out, sums, active, eps)
        return out, sums


def sweeps_of(costs) -> Sweeps:
    """The sweeps of stored costs [B, N, M] or of transferops.ot._Points, summed in float64 for
    float64 data, else in float32."""
    data = costs.x if isinstance(costs, _Points) else costs
    acc = torch.float64 if data.dtype == torch.float64 else torch.float32
    if not isinstance(costs, _Points):
        return Sweeps(C=costs, acc=acc)
    labels = None if costs.labels is None else (costs.labels[0], costs.labels[1], costs.labels[2].to(acc))
    return Sweeps(x=costs.x.detach(), y=costs.y.detach(), scale=costs.scale, labels=labels, acc=acc)


def sinkhorn(costs, a, b, eps, rho, tol, max_iter, schedule, symmetric, progress):
    """The "triton" backend of transferops.ot's sinkhorn_op (its arguments and results)."""
    sweeps = sweeps_of(costs)
    report = _progress_printer(sweeps.B, sweeps.N, sweeps.M) if progress else None
    return solve(sweeps, a, b, eps, rho, tol, max_iter, schedule, symmetric, report)


def envelope_sums(sweeps: Sweeps, a, b, f, g, eps):
    """(sum_j b_j E_ij, sum_i a_i E_ij, P y, P^T x) in float64 for the envelope-theorem
    gradients (transferops.ot._envelope_gradients), from two APPLY sweeps."""
    acc, everyone = sweeps.acc, torch.ones(sweeps.B, dtype=torch.int32, device=sweeps.device)
    f, g, la, lb = f.to(acc), g.to(acc), a.to(acc).log(), b.to(acc).log()
    Sy, row_sums = sweeps.apply(f, g, lb, eps, everyone)
    Sx, col_sums = sweeps.apply(g, f, la, eps, everyone, transposed=True)
    a, b = a.double(), b.double()
    return row_sums.double(), col_sums.double(), a[..., None] * Sy.double(), b[..., None] * Sx.double()
