"""Fused recurrent ops (``aten.lstm``, ``aten.gru``, ``aten.rnn_tanh``, ``aten.rnn_relu``) as
the cells they compute, for the BK trace.

``nn.LSTM``/``nn.GRU``/``nn.RNN`` call one fused op whose weights no per-sample rule can see
into. Traced through these decompositions, every layer and direction becomes an input
projection ``F.linear(x_seq, W_ih, b_ih)`` over the whole sequence (one Linear site, T
positions) and one hidden projection ``F.linear(h_t, W_hh, b_hh)`` per time step (T sites of
one weight, which the Linear rule merges: the positions of a reused weight, cross terms
included), plus elementwise gates. Per-sample norms and clipped sums are then exact by the
ordinary rules. Only the traced program uses them: the module's own forward (evaluation,
``torch.no_grad()``) keeps the fused kernel.

Gate order and formulas are PyTorch's (``nn.LSTM``: i, f, g, o; ``nn.GRU``: r, z, n), with
``proj_size`` (LSTM), ``bidirectional``, ``batch_first``, ``num_layers`` and inter-layer
``dropout``. Packed sequences (the ``.data`` overloads) are not decomposed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _lstm_cell(x_proj, h, c, w_hh, b_hh, w_hr):
    gates = x_proj + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (F.linear(h, w_hr) if w_hr is not None else h), c


def _gru_cell(x_proj, h, w_hh, b_hh):
    xr, xz, xn = x_proj.chunk(3, dim=-1)
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _run(kind, x, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first, nonlinearity=None):
    """The stacked recurrence; ``x``: [T, B, F] after ``batch_first`` is undone."""
    seq = x.transpose(0, 1) if batch_first else x
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(params[k * per:(k + 1) * per])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[4 if has_biases else 2] if per in (3, 5) else None
            proj = F.linear(seq, w_ih, b_ih)  # [T, B, gates]: one site, T positions
            steps = range(seq.shape[0] - 1, -1, -1) if d else range(seq.shape[0])
            h = hx[0][k]
            c = hx[1][k] if kind == "lstm" else None
            ys = [None] * seq.shape[0]
            for t in steps:
                if kind == "lstm":
                    h, c = _lstm_cell(proj[t], h, c, w_hh, b_hh, w_hr)
                elif kind == "gru":
                    h = _gru_cell(proj[t], h, w_hh, b_hh)
                else:
                    h = nonlinearity(proj[t] + F.linear(h, w_hh, b_hh))
                ys[t] = h
            outs.append(torch.stack(ys))
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        seq = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if dropout and train and layer < num_layers - 1:
            seq = F.dropout(seq, dropout, training=True)
    out = seq.transpose(0, 1) if batch_first else seq
    return out, torch.stack(h_n), (torch.stack(c_n) if kind == "lstm" else None)


def _lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
          batch_first):
    return _run("lstm", input, hx, params, has_biases, num_layers, dropout, train,
                bidirectional, batch_first)


def _gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first):
    out, h, _ = _run("gru", input, (hx,), params, has_biases, num_layers, dropout, train,
                     bidirectional, batch_first)
    return out, h


def _rnn(nonlinearity):
    def rnn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
            batch_first):
        out, h, _ = _run("rnn", input, (hx,), params, has_biases, num_layers, dropout, train,
                         bidirectional, batch_first, nonlinearity)
        return out, h
    return rnn


RECURRENT_DECOMPOSITIONS = {
    aten.lstm.input: _lstm,
    aten.gru.input: _gru,
    aten.rnn_tanh.input: _rnn(torch.tanh),
    aten.rnn_relu.input: _rnn(torch.relu),
}
