"""Cases for selections: indexing, slicing, concatenation, padding, flips, repeats, ..."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Case, rand

x = rand(6, 5)
b3 = rand(2, 4, 3)
img = rand(1, 4, 4, 4)
idx = torch.tensor([[0, 1], [2, 2], [4, 0], [1, 1], [3, 3], [0, 0]])

CASES = [
    Case("__getitem__", lambda a: a[1:] - a[:-1], (x,), exact_nnz=True, id="getitem-diff"),
    Case("__getitem__", lambda a: a[::2, -3:], (x,), exact_nnz=True, id="getitem-step"),
    Case("__getitem__", lambda a: a[None, ..., 2], (b3,), exact_nnz=True, id="getitem-none"),
    Case("__getitem__", lambda a: a[[0, 2, 2]], (x,), id="getitem-list"),
    Case("__getitem__", lambda a: a[torch.tensor([1, 0]), :, torch.tensor([2, 1])], (b3,),
         id="getitem-advanced"),
    Case("__getitem__", lambda a: a[x > 0], (x,), id="getitem-mask"),
    Case("__getitem__", lambda a: a[-1, 1:4:2], (x,), id="getitem-int"),
    Case("select", lambda a: a.select(1, -1), (x,)),
    Case("narrow", lambda a: torch.narrow(a, 0, 1, 3), (x,)),
    Case("index_select", lambda a: torch.index_select(a, 1, torch.tensor([4, 0, 0])), (x,)),
    Case("gather", lambda a: torch.gather(a, 1, idx), (x,)),
    Case("take_along_dim", lambda a: torch.take_along_dim(a, idx, dim=1), (x,)),
    Case("take", lambda a: torch.take(a, torch.tensor([[0, 7], [29, 3]])), (x,)),
    Case("masked_select", lambda a: torch.masked_select(a, x > 0), (x,)),
    Case("chunk", lambda a: a.chunk(2, dim=1)[1] * 2, (x,)),
    Case("split", lambda a: torch.split(a, [1, 4], dim=1)[1], (x,)),
    Case("tensor_split", lambda a: torch.tensor_split(a, 3)[2], (x,)),
    Case("unbind", lambda a: a.unbind(1)[0] * a.unbind(1)[3], (x,)),
    Case("cat", lambda a: torch.cat([a, 2 * a[:, :2]], dim=1), (x,), exact_nnz=True),
    Case("concat", lambda a, b: torch.concat((a, b)), (x, rand(2, 5)), wrt=(0, 1)),
    Case("concatenate", lambda a: torch.concatenate([a.exp(), a], 0), (x,)),
    Case("stack", lambda a, b: torch.stack([a, b], dim=-1), (x, rand(6, 5, seed=2)), wrt=(0, 1)),
    Case("hstack", lambda a: torch.hstack([a, a]), (x,)),
    Case("vstack", lambda a: torch.vstack([a, a[0]]), (x,)),
    Case("row_stack", lambda a: torch.row_stack([a, a]), (x,)),
    Case("dstack", lambda a: torch.dstack([a, a]), (x,)),
    Case("flip", lambda a: a.flip(0, 1), (x,)),
    Case("flip", lambda a: torch.flip(a, dims=[1]), (x,), id="flip-kw"),
    Case("fliplr", lambda a: torch.fliplr(a), (x,)),
    Case("flipud", lambda a: a.flipud(), (x,)),
    Case("roll", lambda a: torch.roll(a, shifts=2, dims=1), (x,)),
    Case("roll", lambda a: a.roll(3), (x,), id="roll-flat"),
    Case("repeat", lambda a: a.repeat(2, 1, 3), (x,)),
    Case("tile", lambda a: torch.tile(a, (2,)), (x,)),
    Case("repeat_interleave", lambda a: a.repeat_interleave(2, dim=0), (x,)),
    Case("diagonal", lambda a: torch.diagonal(a, offset=1), (x,)),
    Case("diag", lambda a: torch.diag(a[0]), (x,)),
    Case("diag_embed", lambda a: torch.diag_embed(a), (x,)),
    Case("tril", lambda a: torch.tril(a, diagonal=-1), (x,), exact_nnz=True),
    Case("triu", lambda a: a.triu(1), (x,), exact_nnz=True),
    Case("unfold", lambda a: a.unfold(1, 2, 1), (x,)),
    Case("pixel_shuffle", nn.PixelShuffle(2), (img,)),
    Case("pixel_unshuffle", lambda a: F.pixel_unshuffle(a, downscale_factor=2), (img,)),
    Case("channel_shuffle", nn.ChannelShuffle(2), (img,)),
    Case("pad", lambda a: F.pad(a, (1, 2)), (x,), exact_nnz=True),
    Case("pad", lambda a: F.pad(a, (1, 1, 2, 0), mode="reflect"), (b3,), id="pad-reflect"),
    Case("pad", lambda a: F.pad(a, (2, 1), mode="replicate"), (b3,), id="pad-replicate"),
    Case("pad", lambda a: F.pad(a, (1, 2), mode="circular"), (b3,), id="pad-circular"),
    Case("pad", nn.ZeroPad2d((1, 0, 2, 1)), (img,), id="pad-module"),
    Case("pad", lambda a: F.pad(F.pad(a, (1, 1)) * 2, (0, 0, 1, 1))[1:, 1:-1], (x,),
         exact_nnz=True, id="pad-twice-then-slice"),
    Case("embedding", lambda w: F.embedding(torch.tensor([[1, 2, 2], [0, 5, 1]]), w), (x,),
         exact_nnz=True),
    Case("embedding", lambda w: F.embedding(torch.tensor([1, 2, 0]), w, padding_idx=0), (x,),
         id="embedding-padding"),
]
