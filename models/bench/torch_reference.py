"""The ensemble's architecture in PyTorch: the reference ``fabwatch bench inference`` compares the ONNX serving
path with (cuDNN LSTM/GRU on a GPU). Benchmark only: torch is the optional ``[bench]`` extra, never a serving
dependency, and the weights are untrained (speed does not depend on them).

Layer sizes follow the Keras members (``models/stacked_lstm.py`` ... ``models/rules.py``) and the gate
(``models/ensemble.py``), for the classify task. PyTorch's LSTMs carry two bias vectors where Keras has one, so
the parameter counts differ by 4 x units per LSTM direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fabwatch.models.sizes import Size, units

# the in-graph rules of models/rules.py
Z_LIMIT, ROC_LIMIT, STUCK_STEPS, STUCK_RANGE = 3.0, 3.0, 10, 1e-4
RULE_SEGMENT, LSTM_SEGMENT = 10, 4
LAYER_NORM_EPS = 1e-3  # Keras' LayerNormalization default


def _last_hidden(h: torch.Tensor) -> torch.Tensor:
    """The last layer's final state of an LSTM/GRU ``h_n`` [layers * directions, B, H]."""
    return h[-1]


class StackedLSTM(nn.Module):
    def __init__(self, n_features: int, size: Size):
        super().__init__()
        w = units(128, size)
        self.embed = nn.Linear(n_features, w)
        self.lstm12 = nn.LSTM(w, w, num_layers=2, batch_first=True)  # lstm1 and lstm2: one cuDNN call
        self.lstm3 = nn.LSTM(w, units(64, size), batch_first=True)
        self.dense1 = nn.Linear(units(64, size), units(128, size))
        self.dense2 = nn.Linear(units(128, size), units(64, size))
        self.out_features = units(64, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm12(self.embed(x))
        _, (h, _) = self.lstm3(x)
        return F.relu(self.dense2(F.relu(self.dense1(_last_hidden(h)))))


class ResidualGRU(nn.Module):
    def __init__(self, n_features: int, size: Size):
        super().__init__()
        w = units(120, size)
        self.project = nn.Linear(n_features, w)
        self.grus = nn.ModuleList(nn.GRU(w, w, batch_first=True) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(w, eps=LAYER_NORM_EPS) for _ in range(3))
        self.dense1 = nn.Linear(w, units(64, size))
        self.out_features = units(64, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        for gru, norm in zip(self.grus[:2], self.norms[:2]):
            x = norm(gru(x)[0] + x)
        _, h = self.grus[2](x)
        x = self.norms[2](_last_hidden(h) + x[:, -1])
        return F.relu(self.dense1(x))


class CNNLSTM(nn.Module):
    KERNELS = (3, 7, 15)

    def __init__(self, n_features: int, size: Size):
        super().__init__()
        c = units(64, size)
        self.convs = nn.ModuleList(nn.Conv1d(n_features, c, k, padding=k // 2) for k in self.KERNELS)
        self.bilstm = nn.LSTM(3 * c, units(128, size), batch_first=True, bidirectional=True)
        self.lstm = nn.LSTM(2 * units(128, size), units(64, size), batch_first=True)
        self.dense1 = nn.Linear(units(64, size), units(64, size))
        self.out_features = units(64, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.transpose(1, 2)
        x = torch.cat([F.relu(conv(channels)) for conv in self.convs], dim=1).transpose(1, 2)
        x, _ = self.bilstm(x)
        _, (h, _) = self.lstm(x)
        return F.relu(self.dense1(_last_hidden(h)))


class Spike(nn.Module):
    HEADS = 4

    def __init__(self, n_features: int, size: Size):
        super().__init__()
        w, key_dim = units(128, size), units(64, size)
        self.conv1 = nn.Conv1d(n_features, w, 3, padding=1)
        self.conv2 = nn.Conv1d(w, w, 5, padding=2)
        # Keras' MultiHeadAttention: 4 heads of key_dim each, projected back to the input width
        self.query, self.key, self.value = (nn.Linear(w, self.HEADS * key_dim) for _ in range(3))
        self.attention_out = nn.Linear(self.HEADS * key_dim, w)
        self.norm = nn.LayerNorm(w, eps=LAYER_NORM_EPS)
        self.bilstm = nn.LSTM(w, units(128, size), batch_first=True, bidirectional=True)
        self.dense1 = nn.Linear(2 * units(128, size), units(128, size))
        self.dense2 = nn.Linear(units(128, size), units(64, size))
        self.out_features = units(64, size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.HEADS, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x.transpose(1, 2))))).transpose(1, 2)
        att = F.scaled_dot_product_attention(self._heads(self.query(x)), self._heads(self.key(x)),
                                             self._heads(self.value(x)))
        att = self.attention_out(att.transpose(1, 2).flatten(2))
        x = self.norm(x + att)
        _, (h, _) = self.bilstm(x)
        x = torch.cat([h[-2], h[-1]], dim=-1)  # forward and backward final states
        return F.relu(self.dense2(F.relu(self.dense1(x))))


class RuleBased(nn.Module):
    def __init__(self, n_features: int, window: int, size: Size):
        super().__init__()
        hidden = units(32, size)
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        evidence = (window // RULE_SEGMENT) * 3 * n_features + (window // LSTM_SEGMENT) * hidden
        self.dense1 = nn.Linear(evidence, units(64, size))
        self.dense2 = nn.Linear(units(64, size), units(32, size))
        self.out_features = units(32, size)

    @staticmethod
    def flags(x: torch.Tensor) -> torch.Tensor:
        """[B,T,F] -> [B,T,3F]: z exceedance, rate of change, stuck (as ``fabwatch.models.members.rules.RuleFlags``)."""
        zeros = torch.zeros_like(x[:, :1])
        z_flag = (x.abs() > Z_LIMIT).to(x.dtype)
        roc_flag = torch.cat([zeros, ((x[:, 1:] - x[:, :-1]).abs() > ROC_LIMIT).to(x.dtype)], dim=1)
        channels = x.transpose(1, 2)
        spread = F.max_pool1d(channels, STUCK_STEPS, 1) + F.max_pool1d(-channels, STUCK_STEPS, 1)
        stuck = (spread.transpose(1, 2) < STUCK_RANGE).to(x.dtype)
        stuck_flag = torch.cat([zeros.expand(-1, STUCK_STEPS - 1, -1), stuck], dim=1)
        return torch.cat([z_flag, roc_flag, stuck_flag], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flags = F.avg_pool1d(self.flags(x).transpose(1, 2), RULE_SEGMENT).transpose(1, 2).flatten(1)
        seq, _ = self.lstm(x)
        seq = F.avg_pool1d(seq.transpose(1, 2), LSTM_SEGMENT).transpose(1, 2).flatten(1)
        return F.relu(self.dense2(F.relu(self.dense1(torch.cat([flags, seq], dim=-1)))))


class Gate(nn.Module):
    """Softmax weights over the members from each feature's mean, std and last value."""

    def __init__(self, n_features: int, n_members: int, size: Size):
        super().__init__()
        self.hidden = nn.Linear(3 * n_features, units(64, size))
        self.logits = nn.Linear(units(64, size), n_members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1)
        std = torch.sqrt(((x - mean[:, None]) ** 2).mean(dim=1) + 1e-6)
        stats = torch.cat([mean, std, x[:, -1]], dim=-1)
        return torch.softmax(self.logits(F.relu(self.hidden(stats))).float(), dim=-1)


class Ensemble(nn.Module):
    """Five members with sigmoid heads and the gate: outputs ``score`` [B], ``member_scores`` and ``weights`` [B,5]."""

    def __init__(self, window: int, n_features: int, size: Size):
        super().__init__()
        self.members = nn.ModuleList([StackedLSTM(n_features, size), ResidualGRU(n_features, size),
                                      CNNLSTM(n_features, size), Spike(n_features, size),
                                      RuleBased(n_features, window, size)])
        self.heads = nn.ModuleList(nn.Linear(m.out_features, 1) for m in self.members)
        self.gate = Gate(n_features, len(self.members), size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        members = torch.cat([torch.sigmoid(head(m(x))).float() for m, head in zip(self.members, self.heads)], dim=-1)
        weights = self.gate(x)
        return (members * weights).sum(dim=-1), members, weights


def build(window: int = 100, n_features: int = 12, size: Size = "full") -> Ensemble:
    """A fresh (untrained) reference ensemble in inference mode."""
    return Ensemble(window, n_features, size).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
