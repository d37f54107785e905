"""The gathered kernel as two Triton kernels, for CUDA: a segmented LoRA GEMM in the manner of punica's SGMV.

`gathered_delta` (sparse.py) on a GPU would gather every (pair, input) element through index tensors as large
as the factors it reads; here each pair's factors are read as tiles instead, in two launches per layer for any
number of experts and pairs:

    shrink   grid (P, ⌈T / BM⌉):        u[p, t] = w_p · x[b_p, t] A_{s_p}ᵀ             ([P, T, R] float32)
    expand   grid (B, ⌈T / BM⌉, ⌈out / BN⌉): y[b, t] += Σ_{p of row b} u[p, t] B_{s_p}ᵀ  (in place, no atomics:
                                             each program owns its tile of y and loops over its row's pairs)

on the layer's stacks `a_s: [S, in, r]`, `b_s: [S, r, out]` (zero-padded to r; R is r rounded up to a power of
two, at least 16, for tl.dot), with the pairs of `LayerRoutes` sorted by row. Float32 runs its dots in IEEE
precision, bf16 and fp16 in their own with float32 accumulation.

`available(x)` says whether it can run for this input: CUDA tensors and an importable Triton, or CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported: how CI tests it against the
reference). The mixing layers use it on CUDA only, unless TWINRT_TRITON=0.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BM, BK, BN = 16, 64, 64  # token rows per tile, input columns per step, output columns per tile
ENABLED = os.environ.get("TWINRT_TRITON", "1") != "0"  # TWINRT_TRITON=0: CUDA's gathered kernel uses embedding bags


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for an input like `x`."""
    if not _importable():
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreted())


@functools.cache
def _kernels(interpret: bool):  # the flag keys the cache: kernels built under the interpreter are its own
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, u_ptr, rows_ptr, slots_ptr, w_ptr, T, IN, RS,
               sxb, sxt, sas, sak, sup, sut,
               R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)  # 64-bit offsets: p * sup (and b * sxb) pass 2^31 on large layers
        mb = tl.program_id(1)
        b = tl.load(rows_ptr + p)
        s = tl.load(slots_ptr + p)
        w = tl.load(w_ptr + p)
        om = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        orr = tl.arange(0, R)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + b * sxb + om[:, None] * sxt + ok[None, :],
                         mask=(om[:, None] < T) & (ok[None, :] < IN), other=0.0)
            at = tl.load(a_ptr + s * sas + ok[:, None] * sak + orr[None, :],
                         mask=(ok[:, None] < IN) & (orr[None, :] < RS), other=0.0)
            acc += tl.dot(xt, at, input_precision=PRECISION)
        tl.store(u_ptr + p * sup + om[:, None] * sut + orr[None, :], acc * w, mask=om[:, None] < T)

    @triton.jit
    def expand(u_ptr, b_ptr, y_ptr, slots_ptr, starts_ptr, T, OUT, RS,
               sup, sut, sbs, sbr, syb, syt,
               R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        mb = tl.program_id(1)
        nb = tl.program_id(2)
        om = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        on = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        orr = tl.arange(0, R)
        start = tl.load(starts_ptr + b)
        end = tl.load(starts_ptr + b + 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in range(start, end):
            s = tl.load(slots_ptr + p)
            ut = tl.load(u_ptr + p * sup + om[:, None] * sut + orr[None, :], mask=om[:, None] < T, other=0.0)
            bt = tl.load(b_ptr + s * sbs + orr[:, None] * sbr + on[None, :],
                         mask=(orr[:, None] < RS) & (on[None, :] < OUT), other=0.0)
            acc += tl.dot(ut.to(bt.dtype), bt, input_precision=PRECISION)
        mask = (om[:, None] < T) & (on[None, :] < OUT)
        ptrs = y_ptr + b * syb + om[:, None] * syt + on[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)

    return shrink, expand


def gathered_add_(y: torch.Tensor, x: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, routes) -> None:
    """y[b] += Σ_p w_p B_{s_p} A_{s_p} x[b] for the pairs of `routes` (LayerRoutes, on x's device), in place.
    x: [B, in] or [B, T, in]; y: the same shape with `out` last."""
    import triton

    shrink, expand = _kernels(interpreted())
    batch, in_f = x.shape[0], x.shape[-1]
    out_f = b_s.shape[-1]
    xv = x.reshape(batch, -1, in_f).contiguous()  # [B, T, in]
    yv = y.view(batch, -1, out_f)  # [B, T, out], y contiguous
    t = xv.shape[1]
    pairs = routes.rows.numel()
    if batch != routes.batch:
        raise ValueError(f"the input has {batch} rows, the routes {routes.batch}")
    if pairs == 0:
        return
    rank = a_s.shape[-1]
    r_pad = max(16, triton.next_power_of_2(rank))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 names the default; 16-bit inputs ignore it
    a_s, b_s = a_s.contiguous(), b_s.contiguous()
    u = torch.empty(pairs, t, r_pad, device=x.device, dtype=torch.float32)
    weights = routes.weights.to(torch.float32)
    shrink[(pairs, triton.cdiv(t, BM))](
        xv, a_s, u, routes.rows, routes.slots, weights, t, in_f, rank,
        xv.stride(0), xv.stride(1), a_s.stride(0), a_s.stride(1), u.stride(0), u.stride(1),
        R=r_pad, BLOCK_M=BM, BLOCK_K=BK, PRECISION=precision)
    expand[(batch, triton.cdiv(t, BM), triton.cdiv(out_f, BN))](
        u, b_s, yv, routes.slots, routes.row_starts, t, out_f, rank,
        u.stride(0), u.stride(1), b_s.stride(0), b_s.stride(1), yv.stride(0), yv.stride(1),
        R=r_pad, BLOCK_M=BM, BLOCK_N=BN, PRECISION=precision)
