"""Renders docs/spy.png, the picture in the README: python docs/make_spy.py"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

import sparsejac

rng = np.random.default_rng(0)
fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=90)
x, w = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
J = sparsejac.jacobian("ij,jk->ik", x, w)
sparsejac.spy(J, ax=axes[0], max_pixels=256, out_shape=(64, 64))
axes[0].set_title("'ij,jk->ik' wrt x, 64 x 64\n" + axes[0].get_title(), fontsize=10)
patches, kernel = rng.standard_normal((1, 2, 8, 8, 3, 3)), rng.standard_normal((3, 2, 3, 3))
Jk = sparsejac.jacobian("bchwkt,fckt->bfhw", patches, kernel, wrt=1)
sparsejac.spy(Jk, ax=axes[1], max_pixels=256, out_shape=(1, 3, 8, 8))
axes[1].set_title("'bchwkt,fckt->bfhw' wrt the kernel\n" + axes[1].get_title(), fontsize=10)
fig.tight_layout()
fig.savefig("docs/spy.png")
