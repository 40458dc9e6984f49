"""Channel predictors that need no large model: LLM4CP's baselines (papers.md §4.1).

Every predictor maps past CSI (B, P, 2S) real (real parts, then imaginary parts) to the future
(B, F, 2S'), like ``tasks.channel.ChannelPredictor``:

- ``repeat_last``: no prediction, the last past slot for every future slot (TDD; for FDD the
  uplink band's last slot stands for the downlink band, which is what "no prediction" can offer);
- ``ar_predict``: a Prony-type linear predictor of order p fitted by least squares on each
  sample's own past, per sample over all subcarriers jointly (a scalar AR model shared by the
  subcarriers, as PAD fits one model per angular-delay component), rolled forward F slots (TDD);
- ``GRUPredictor``, ``LSTMPredictor``: a recurrent encoder over the past slots and a linear map
  of its last state to the F future slots;
- ``TransformerPredictor``: a small transformer encoder trained from scratch on the slots, then
  linear maps over features and time (the LLM4CP shape without the pretrained backbone).

``fit`` trains any of the torch predictors with the task's NMSE loss (Adam, seeded), centrally.
``nmse_db`` and ``mrt_spectral_efficiency`` score any of them (and the LAM) on a set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgelam.channels.samples import complex_to_real, nmse_per_sample, real_to_complex


def repeat_last(past: Tensor, future: int, features_out: int | None = None) -> Tensor:
    last = past[:, -1:, :]
    out = last.expand(-1, future, -1)
    if features_out is not None and features_out != past.shape[-1]:
        raise ValueError(f"repeat_last maps {past.shape[-1]} features to themselves, not {features_out}")
    return out.contiguous()


def ar_coefficients(h: Tensor, order: int) -> Tensor:
    """Least-squares AR(order) coefficients (B, order) complex of each sample's slots h (B, P, S):
    h[t] ~ sum_i c_i h[t - 1 - i] for t = order..P-1, over all subcarriers jointly."""
    b, p, s = h.shape
    if not 1 <= order < p:
        raise ValueError(f"AR order must be in [1, {p - 1}] for {p} past slots, got {order}")
    rows = [h[:, t - order: t].flip(1).transpose(1, 2) for t in range(order, p)]  # each (B, S, order)
    x = torch.cat(rows, dim=1)  # (B, (P - order) * S, order)
    y = torch.cat([h[:, t] for t in range(order, p)], dim=1).unsqueeze(-1)  # (B, (P - order) * S, 1)
    return torch.linalg.lstsq(x, y, driver="gelsd" if not x.is_cuda else None).solution.squeeze(-1)


def ar_predict(past: Tensor, future: int, order: int = 4) -> Tensor:
    """Roll each sample's own AR(order) model forward ``future`` slots (TDD)."""
    h = real_to_complex(past).to(torch.complex128)
    c = ar_coefficients(h, order)  # (B, order)
    hist = list(h.unbind(1))
    for _ in range(future):
        nxt = sum(c[:, i: i + 1] * hist[-1 - i] for i in range(order))
        hist.append(nxt)  # type: ignore[arg-type]
    return complex_to_real(torch.stack(hist[-future:], dim=1).to(torch.complex64))


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], features_in: int, features_out: int, future: int, hidden: int) -> None:
        super().__init__()
        self.rnn = cell(features_in, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, future * features_out)
        self.future, self.features_out = future, features_out

    def forward(self, past: Tensor) -> Tensor:
        scale = past.std(dim=(1, 2), keepdim=True) + 1e-6
        states, _ = self.rnn(past / scale)
        return self.out(states[:, -1]).view(-1, self.future, self.features_out) * scale  # type: ignore[no-any-return]


class GRUPredictor(_Recurrent):
    def __init__(self, features_in: int, features_out: int, future: int, hidden: int = 128) -> None:
        super().__init__(nn.GRU, features_in, features_out, future, hidden)


class LSTMPredictor(_Recurrent):
    def __init__(self, features_in: int, features_out: int, future: int, hidden: int = 128) -> None:
        super().__init__(nn.LSTM, features_in, features_out, future, hidden)


class TransformerPredictor(nn.Module):
    """A 2-layer transformer encoder over the past slots, trained from scratch."""

    def __init__(self, features_in: int, features_out: int, past: int, future: int, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features_in, d_model)
        self.position = nn.Parameter(torch.zeros(past, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.out = nn.Linear(d_model, features_out)
        self.time = nn.Linear(past, future)

    def forward(self, past: Tensor) -> Tensor:
        scale = past.std(dim=(1, 2), keepdim=True) + 1e-6
        hidden = self.encoder(self.embed(past / scale) + self.position)
        return self.time(self.out(hidden).transpose(1, 2)).transpose(1, 2) * scale  # type: ignore[no-any-return]


def fit(model: nn.Module, past: Tensor, future: Tensor, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
        seed: int = 0) -> list[float]:
    """Train ``model`` on (past, future) with the NMSE loss; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        order, total = torch.randperm(len(past), generator=gen), 0.0
        for i in range(0, len(past), batch_size):
            idx = order[i: i + batch_size]
            loss = nmse_per_sample(model(past[idx]), future[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(past))
    model.eval()
    return losses


def nmse_db(pred: Tensor, target: Tensor) -> float:
    """10 log10(sum ||pred - target||^2 / sum ||target||^2) over a set."""
    err = (pred.float() - target.float()).pow(2).sum()
    return float(10 * torch.log10(err / target.float().pow(2).sum()))


def mrt_spectral_efficiency(pred: Tensor, target: Tensor, antennas: int, snr_db: float) -> float:
    """Mean spectral efficiency (bit/s/Hz) of MRT beamforming designed on ``pred`` and sent over the
    true channel ``target``, as LLM4CP scores its predictors: per user, future slot and subcarrier,
    w = h_hat / ||h_hat|| over the BS antennas and SE = log2(1 + rho |h^H w|^2), rho the transmit SNR
    (the channels have unit average power per antenna). ``pred`` and ``target`` are (N, F, 2S)
    real with N = users x ``antennas`` links, each user's links consecutive (``channels/csi.py``'s
    order). ``pred = target`` gives the perfect-CSI bound log2(1 + rho ||h||^2)."""
    n, f, _ = target.shape
    if n % antennas or pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be the same shape, "
                         f"with N a multiple of {antennas} antennas")
    h = real_to_complex(target).to(torch.complex128).reshape(n // antennas, antennas, f, -1)
    w = real_to_complex(pred).to(torch.complex128).reshape(n // antennas, antennas, f, -1)
    w = w / w.abs().pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
    gain = (w.conj() * h).sum(dim=1).abs().pow(2)  # (users, F, S)
    return float(torch.log2(1 + 10 ** (snr_db / 10) * gain).mean())
