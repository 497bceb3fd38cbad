"""Cases for the matmul family, batched linear algebra written as torch writes it, vector and
matrix norms (at zeros and ties too), statistics (cov, corrcoef, quantiles with ties), and the
Fourier transforms with real results."""

from __future__ import annotations

import torch

from . import D, Case, rand

x = rand(4, 3)
v = rand(5)
M = rand(3, 4, seed=1)
BA, BB = rand(2, 4, 3, seed=2), rand(2, 3, 5, seed=3)
A = rand(2, 3, 3, seed=4) + 3 * torch.eye(3, dtype=D)
LU, PIV = torch.linalg.lu_factor(A)
QR, TAU = torch.geqrf(rand(4, 3, seed=5))
T6 = rand(2, 3, 6, seed=6) + 3 * torch.eye(6, dtype=D).reshape(2, 3, 6)
# zeros and ties: each row of Z has a zero, rows 1 and 3 tie in absolute value
Z = torch.tensor([[0.0, 1.5, -2.0], [2.0, 0.0, -2.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]],
                 dtype=D)
TIES = torch.tensor([[1.0, 3.0, 3.0, -1.0, 2.0], [0.5, 0.5, 0.5, 4.0, -2.0]], dtype=D)
NANS = torch.tensor([[1.0, float("nan"), 3.0, -1.0], [0.5, 2.0, 0.5, 4.0]], dtype=D)
SIG = rand(3, 7, seed=7)
lv = torch.linalg.vector_norm
MASKED = x.masked_fill(torch.tensor([[False], [True], [False], [False]]), float("-inf"))
MASKED[2, 1] = float("-inf")

CASES = [
    # the matmul family (rules/linalg.py)
    Case("addmv", lambda a: torch.addmv(a[0], a, a[1] ** 2, beta=0.5, alpha=2.0), (M[:, :3],)),
    Case("addmv", lambda a: torch.addmv(v[:4], M.T, a, beta=0), (M[:, 0],), id="addmv-beta0"),
    Case("baddbmm", lambda a: torch.baddbmm(a[:, :, :1], a, BB, beta=2.0, alpha=-1.0), (BA,)),
    Case("baddbmm", lambda b: torch.baddbmm(BA[0, 0, :1], BA, b), (BB,), id="baddbmm-b2"),
    Case("addbmm", lambda a: torch.addbmm(a[0, :, :1], a, BB, alpha=0.5), (BA,)),
    Case("addbmm", lambda b: torch.addbmm(BA[0, 0, 0], BA, b, beta=0), (BB,), id="addbmm-b2"),
    Case("tensordot", lambda a: torch.tensordot(a, BB, dims=([0, 2], [0, 1])), (BA,)),
    Case("tensordot", lambda a: torch.tensordot(a, (a * 2).T, dims=1), (M,), id="tensordot-int"),
    Case("tensordot", lambda a: torch.tensordot(a, a, dims=torch.tensor([[1], [0]])),
         (rand(3, 3, seed=8),), id="tensordot-tensor"),
    Case("linalg_multi_dot", lambda a: torch.linalg.multi_dot([a[0], M, a, a[1]]), (M.T,)),
    Case("linalg_multi_dot", lambda a: torch.linalg.multi_dot([a, M]), (x[:2],),
         id="multi_dot-matrices"),
    # batched small linear algebra (rules/blocks.py)
    Case("lu_solve", lambda b, lu: torch.lu_solve(b, lu, PIV), (rand(2, 3, 2, seed=9), LU),
         wrt=(0, 1)),
    Case("linalg_lu_solve", lambda lu, b: torch.linalg.lu_solve(lu, PIV, b, adjoint=True),
         (LU, rand(2, 3, 2, seed=10)), wrt=(0, 1)),
    Case("linalg_lu_solve", lambda b: torch.linalg.lu_solve(LU, PIV, b, left=False),
         (rand(2, 4, 3, seed=11),), id="lu_solve-right"),
    Case("linalg_householder_product", torch.linalg.householder_product, (QR, TAU),
         wrt=(0, 1)),
    Case("orgqr", torch.orgqr, (QR, TAU), wrt=(0, 1)),
    Case("ormqr", lambda a, t, c: torch.ormqr(a, t, c, transpose=True),
         (QR, TAU, rand(4, 2, seed=12)), wrt=(0, 1, 2)),
    Case("ormqr", lambda c: torch.ormqr(QR, TAU, c, left=False), (rand(2, 4, seed=13),),
         id="ormqr-right"),
    Case("linalg_tensorinv", lambda a: torch.linalg.tensorinv(a.reshape(6, 2, 3), ind=1),
         (A[0].repeat(2, 2)[:6, :6] + torch.eye(6, dtype=D),), variants=False),
    Case("linalg_tensorsolve", lambda a, b: torch.linalg.tensorsolve(a, b),
         (T6, rand(2, 3, seed=14)), wrt=(0, 1), variants=False),
    Case("linalg_tensorsolve", lambda a: torch.linalg.tensorsolve(a, x[:2], dims=(0,)),
         (T6.permute(2, 0, 1).contiguous(),), id="tensorsolve-dims", variants=False),
    *[Case("linalg_cond", lambda a, p=p: torch.linalg.cond(a, p), (A,), id=f"cond-{p}")
      for p in (None, 2, -2, "nuc")],
    # norms (rules/reduce.py), at zeros and ties as torch's norm_backward takes them
    *[Case("linalg_vector_norm", lambda a, p=p: lv(a, p, dim=1), (Z,), id=f"vector_norm-zeros-{p}",
           variants=False)
      for p in (0, 0.5, -1.5, 1, 1.5, 2, 3, float("inf"), float("-inf"))],
    Case("linalg_vector_norm", lambda a: lv(a, 0.5), (x,), id="vector_norm-p0.5"),
    *[Case("linalg_matrix_norm", lambda a, p=p: torch.linalg.matrix_norm(a, p), (A,),
           id=f"matrix_norm-{p}") for p in ("fro", "nuc", 2, -2, 1, -1, float("inf"))],
    Case("linalg_matrix_norm", lambda a: torch.linalg.matrix_norm(a, 1, dim=(2, 0),
                                                                  keepdim=True), (A,),
         id="matrix_norm-dims-keepdim"),
    Case("linalg_matrix_norm", lambda a: torch.linalg.matrix_norm(a, "nuc", dim=(0, 2),
                                                                  keepdim=True), (A,),
         id="matrix_norm-nuc-keepdim"),
    Case("linalg_norm", lambda a: torch.linalg.norm(a), (x,)),
    Case("linalg_norm", lambda a: torch.linalg.norm(a, 1), (x,), id="linalg_norm-matrix"),
    Case("linalg_norm", lambda a: torch.linalg.norm(a, -1, dim=0, keepdim=True), (Z,),
         id="linalg_norm-vector-zeros", variants=False),
    Case("linalg_norm", lambda a: torch.linalg.norm(a, "nuc", dim=(1, 2)), (A,),
         id="linalg_norm-nuc"),
    Case("norm", lambda a: torch.norm(a, "nuc"), (x,), id="norm-nuc"),
    Case("norm", lambda a: torch.norm(a, 0, dim=1), (Z,), id="norm-p0", variants=False),
    Case("norm", lambda a: a.norm(p="fro", dim=(0, 2)), (A,), id="norm-fro-3d"),
    # written as torch's C++ writes them (rules/composite.py)
    Case("trapz", lambda a: torch.trapz(a, torch.tensor([0.0, 1, 3], dtype=D)), (x,)),
    Case("trapz", lambda a: torch.trapz(a, dx=0.5, dim=0), (x,), id="trapz-dx"),
    Case("dist", lambda a: torch.dist(a, x.flip(0), 3), (x,)),
    Case("dist", lambda a: torch.dist(a, Z), (Z,), id="dist-zero", variants=False),
    Case("cross", lambda a: torch.cross(a, a.flip(0) ** 2), (x,)),
    Case("cross", lambda a: torch.cross(a.T, x.T, dim=0), (x,), id="cross-dim"),
    Case("linalg_vander", lambda a: torch.linalg.vander(a, N=4), (Z,), variants=False),
    Case("linalg_vander", torch.linalg.vander, (v,), id="vander-square"),
    Case("cov", torch.cov, (SIG,)),
    Case("cov", lambda a: torch.cov(a, correction=0, fweights=torch.tensor([1, 2, 1, 3, 1, 1, 2]),
                                    aweights=torch.linspace(0.5, 2, 7, dtype=D)), (SIG,),
         id="cov-weights"),
    Case("cov", lambda w: torch.cov(SIG, aweights=w), (torch.linspace(0.5, 2, 7, dtype=D),),
         id="cov-aweights-traced"),
    Case("cov", torch.cov, (v,), id="cov-1d"),
    Case("corrcoef", torch.corrcoef, (SIG,)),
    Case("corrcoef", torch.corrcoef, (v,), id="corrcoef-1d"),
    *[Case("quantile", lambda a, m=m: torch.quantile(a, torch.tensor([0.0, 0.3, 0.5, 1.0],
                                                                     dtype=D), dim=1,
                                                      interpolation=m), (TIES,),
           id=f"quantile-ties-{m}", variants=False)
      for m in ("linear", "lower", "higher", "midpoint", "nearest")],
    Case("quantile", lambda a: torch.quantile(a, 0.4, dim=0, keepdim=True), (x,),
         id="quantile-dim0"),
    Case("quantile", lambda a: torch.quantile(a, 0.75, keepdim=True), (x,), id="quantile-all"),
    Case("quantile", lambda a: torch.quantile(a, 0.5, dim=1), (NANS,), id="quantile-nan",
         variants=False),
    Case("nanquantile", lambda a: torch.nanquantile(a, torch.tensor([0.2, 0.9], dtype=D),
                                                    dim=1), (NANS,), variants=False),
    Case("nanquantile", lambda a: a.nanquantile(0.5), (TIES,), id="nanquantile-all-ties",
         variants=False),
    # elementwise with torch's zero derivative where piecewise constant (rules/elementwise.py)
    Case("__rmod__", lambda a, b: a.__rmod__(b), (x, x.flip(0) * 3), wrt=(0, 1)),
    Case("angle", lambda a: torch.angle(a) + a, (x,)),
    Case("nextafter", torch.nextafter, (x, x.flip(0)), wrt=(0, 1)),
    *[Case("div", lambda a, m=m: torch.div(a, a.flip(0), rounding_mode=m) + a, (x,),
           id=f"div-{m}") for m in ("floor", "trunc")],
    # aten's softmax forms (rules/reduce.py)
    Case("_safe_softmax.default", lambda a: torch.ops.aten._safe_softmax.default(a, 1), (MASKED,),
         variants=False),
    Case("_safe_softmax", lambda a: torch._safe_softmax(a, 0), (x,)),
    Case("_softmax_backward_data", lambda g, o: torch._softmax_backward_data(g, o, 1, D),
         (x, torch.softmax(x.flip(1), 1)), wrt=(0, 1)),
    Case("_softmax_backward_data.default", lambda g: torch.ops.aten._softmax_backward_data.default(
        g, torch.softmax(x.T, 0), 0, D), (x.T,)),
    # Fourier transforms with real results of real inputs (rules/spectral.py)
    Case("fft_irfft", lambda a: torch.fft.irfft(a, dim=0), (x,)),
    Case("fft_irfft", lambda a: torch.fft.irfft(a, n=7, norm="ortho"), (x,), id="irfft-n7"),
    Case("fft_irfft", lambda a: torch.fft.irfft(a, n=2), (x,), id="irfft-short"),
    Case("fft_hfft", lambda a: torch.fft.hfft(a, dim=0, norm="forward"), (x,)),
    Case("fft_hfft", lambda a: torch.fft.hfft(a, n=5), (x,), id="hfft-n5"),
    Case("fft_irfft2", lambda a: torch.fft.irfft2(a), (A,)),
    Case("fft_irfft2", lambda a: torch.fft.irfft2(a, s=(3, 5), dim=(0, 2)), (A,),
         id="irfft2-s-dims"),
    Case("fft_hfft2", lambda a: torch.fft.hfft2(a, dim=(2, 0), norm="ortho"), (A,)),
    Case("fft_irfftn", lambda a: torch.fft.irfftn(a), (x,)),
    Case("fft_irfftn", lambda a: torch.fft.irfftn(a, s=(4,)), (A,), id="irfftn-s"),
    Case("fft_hfftn", lambda a: torch.fft.hfftn(a, dim=(1,)), (A,)),
    Case("fft_fftshift", lambda a: torch.fft.fftshift(a), (rand(3, 4, seed=15),)),
    Case("fft_fftshift", lambda a: torch.fft.fftshift(a, dim=1), (x,), id="fftshift-dim"),
    Case("fft_ifftshift", lambda a: torch.fft.ifftshift(a, dim=(0, 1)), (rand(3, 5, seed=16),)),
]
