"""Recurrent layers: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells, written as the
equations torch documents for them with registered operations (``F.linear``, ``sigmoid``,
``tanh``, ``chunk``, ``stack``), one step at a time; torch runs them as fused kernels.

Each step's state depends on every earlier input; the terms of the paths that reach one input
step (an LSTM's hidden and cell states) merge, so a layer over ``T`` steps carries about ``T``
terms per state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOperationError
from ..registry import decomposition
from ..tracer import PREFIX


def _affine(x, w, b):
    return F.linear(x, w, b)


def _rnn_step(act):
    def step(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
        return act(_affine(x, w_ih, b_ih) + _affine(h, w_hh, b_hh))
    return step


def _lstm_step(x, hc, w_ih, w_hh, b_ih=None, b_hh=None):
    h, c = hc
    gates = _affine(x, w_ih, b_ih) + _affine(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    i_r, i_z, i_n = _affine(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = _affine(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


CELL = "input hx w_ih w_hh b_ih=None b_hh=None"


@decomposition("rnn_tanh_cell", CELL)
def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    return _rnn_step(torch.tanh)(input, hx, w_ih, w_hh, b_ih, b_hh)


@decomposition("rnn_relu_cell", CELL)
def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    return _rnn_step(torch.relu)(input, hx, w_ih, w_hh, b_ih, b_hh)


@decomposition("lstm_cell", CELL, traced="input hx w_ih w_hh b_ih b_hh")
def lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    return _lstm_step(input, tuple(hx), w_ih, w_hh, b_ih, b_hh)


@decomposition("gru_cell", CELL)
def gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    return _gru_step(input, hx, w_ih, w_hh, b_ih, b_hh)


def _layers(name, step, input, hx, params, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, lstm):
    if not isinstance(input, torch.Tensor):
        raise UnsupportedOperationError(f"{PREFIX}{name!r} over a packed sequence is not supported")
    if train and dropout > 0 and num_layers > 1:
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} in training mode with dropout draws a random mask; call "
            "model.eval()")
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * dirs * per:
        raise UnsupportedOperationError(
            f"{PREFIX}{name!r} with projections (proj_size) is not supported")
    x = input.transpose(0, 1) if batch_first else input  # (T, B, I)
    h0 = hx[0] if lstm else hx
    c0 = hx[1] if lstm else None
    last_h, last_c = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = params[k * per:(k + 1) * per]
            weights = (w[0], w[1], w[2], w[3]) if has_biases else (w[0], w[1], None, None)
            state = (h0[k], c0[k]) if lstm else h0[k]
            seq = []
            steps = range(x.shape[0]) if d == 0 else range(x.shape[0] - 1, -1, -1)
            for t in steps:
                state = step(x[t], state, *weights)
                seq.append(state[0] if lstm else state)
            if d == 1:
                seq.reverse()
            outs.append(torch.stack(seq, 0))
            last_h.append(state[0] if lstm else state)
            if lstm:
                last_c.append(state[1])
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
    out = x.transpose(0, 1) if batch_first else x
    h_n = torch.stack(last_h, 0)
    return (out, h_n, torch.stack(last_c, 0)) if lstm else (out, h_n)


LAYERS = "input hx params has_biases num_layers dropout train bidirectional batch_first"


@decomposition("lstm", LAYERS, traced="input hx params")
def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _layers("lstm", _lstm_step, input, hx, params, has_biases, num_layers, dropout, train,
                   bidirectional, batch_first, True)


@decomposition("gru", LAYERS, traced="input hx params")
def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _layers("gru", _gru_step, input, hx, params, has_biases, num_layers, dropout, train,
                   bidirectional, batch_first, False)


@decomposition("rnn_tanh", LAYERS, traced="input hx params")
def rnn_tanh(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first):
    return _layers("rnn_tanh", _rnn_step(torch.tanh), input, hx, params, has_biases, num_layers,
                   dropout, train, bidirectional, batch_first, False)


@decomposition("rnn_relu", LAYERS, traced="input hx params")
def rnn_relu(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first):
    return _layers("rnn_relu", _rnn_step(torch.relu), input, hx, params, has_biases, num_layers,
                   dropout, train, bidirectional, batch_first, False)
