"""GPU check: x @ w Jacobians built on the GPU against the CPU build and against
torch.func.jacrev on the GPU. Needs a CUDA device.

    python benchmarks/gpu_check.py [--out FILE.md]

Times: the first call (cold) and the best of three later calls, with the device synchronised;
GPU memory: the peak allocated during the call above what was allocated before it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sparsejac


def timed(fn, cuda: bool, reps: int = 3):
    def once():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) if cuda else 0
        return seconds, peak, result

    first, peak, result = once()
    del result
    best = min(once()[0] for _ in range(reps))
    return first, best, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    lines = [f"GPU: {name}; torch {torch.__version__}; float32; x @ w ('ij,jk->ik') wrt x", "",
             "| n | nnz | build | device | first call (s) | best of 3 (s) | GPU peak (GB) |",
             "|---|---|---|---|---|---|---|"]

    def row(n, nnz, build, where, first, best, peak):
        line = f"| {n} | {nnz:.3g} | {build} | {where} | {first:.3f} | {best:.3f} | {peak / 1e9:.2f} |"
        lines.append(line)
        print(line, flush=True)

    # Warm the CUDA context and kernels on a tiny case, as any real program would have.
    sparsejac.jacobian("ij,jk->ik", torch.ones(4, 4, device=dev), torch.ones(4, 4, device=dev),
                       format="torch_csr")
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in (128, 512, 1024):
        x = torch.randn(n, n, device=dev, generator=gen)
        w = torch.randn(n, n, device=dev, generator=gen)
        xc, wc = x.cpu().numpy(), w.cpu().numpy()
        nnz = n**3
        for fmt in ("torch_csr", "torch"):
            first, best, peak = timed(lambda: sparsejac.jacobian("ij,jk->ik", x, w, format=fmt), True)
            row(n, nnz, f"sparsejac {fmt}", "GPU", first, best, peak)
        cpu_fmts = ("csr", "torch") if n <= 512 else ("csr",)
        for fmt in cpu_fmts:
            first, best, _ = timed(lambda: sparsejac.jacobian("ij,jk->ik", xc, wc, format=fmt), False)
            row(n, nnz, f"sparsejac {fmt}", "CPU (host)", first, best, 0)
        if n == 512:
            # The GPU build equals the CPU build entry for entry.
            G = sparsejac.jacobian("ij,jk->ik", x, w, format="torch_csr")
            C = sparsejac.jacobian("ij,jk->ik", xc, wc, format="csr")
            assert np.array_equal(G.crow_indices().cpu().numpy(), C.indptr)
            assert np.array_equal(G.col_indices().cpu().numpy(), C.indices)
            assert np.array_equal(G.values().cpu().numpy(), C.data)
            lines.append("| 512 | | GPU torch_csr == CPU csr (indptr, indices, values) | | yes | | |")
            print("GPU build equals CPU build at n=512", flush=True)
            del G, C
        if n == 128:

            def jacrev():
                return torch.func.jacrev(lambda t: t @ w)(x)

            first, best, peak = timed(jacrev, True)
            row(n, nnz, "torch.func.jacrev (dense)", "GPU", first, best, peak)
            J = jacrev()
            S = sparsejac.jacobian("ij,jk->ik", x, w, format="torch")
            err = (S.to_dense() - J).abs().max().item()
            lines.append(f"| 128 | | max abs(sparsejac - jacrev) | | {err:.1e} | | |")
            print("max abs difference to jacrev at n=128:", err, flush=True)
            del J, S
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
