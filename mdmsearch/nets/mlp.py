"""Residual MLP score network for vector data (works for any data_shape by flattening)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mdmsearch.nets.embeddings import check_state_shape, prepare_time, sinusoidal_embedding
from mdmsearch.nets.registry import register_network


class _ResidualMLPBlock(nn.Module):
    """h + Linear(drop(SiLU(Linear(SiLU(norm(h))) + proj(temb))))."""

    def __init__(self, hidden_dim: int, emb_dim: int, layer_norm: bool, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim) if layer_norm else nn.Identity()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb_proj = nn.Linear(emb_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # h: [B, hidden], emb: [B, emb_dim]
        x = self.fc1(self.act(self.norm(h)))
        x = x + self.emb_proj(emb)
        x = self.fc2(self.dropout(self.act(x)))
        return h + x


@register_network("mlp")
class MLPScoreNet(nn.Module):
    """Noise-prediction MLP: z [B, n, *data_shape], t [B] -> eps_hat [B, n, *data_shape].

    The state is flattened to [B, n * prod(data_shape)], so every variable (data and
    auxiliary) enters the first layer; the output layer is zero-initialised so that
    eps_hat starts at 0.
    """

    def __init__(
        self,
        *,
        n_vars: int,
        data_shape: tuple[int, ...],
        hidden_dim: int,
        num_layers: int,
        time_embed_dim: int,
        layer_norm: bool,
        dropout: float,
        time_scale: float,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mlp: num_layers must be >= 1, got {num_layers}")
        self.n_vars = int(n_vars)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.flat_dim = self.n_vars * math.prod(self.data_shape)
        self.time_embed_dim = int(time_embed_dim)
        self.time_scale = float(time_scale)

        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_embed_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.input_proj = nn.Linear(self.flat_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            _ResidualMLPBlock(hidden_dim, hidden_dim, bool(layer_norm), float(dropout))
            for _ in range(int(num_layers))
        )
        self.out_norm = nn.LayerNorm(hidden_dim) if layer_norm else nn.Identity()
        self.out_act = nn.SiLU()
        self.output_proj = nn.Linear(hidden_dim, self.flat_dim)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        # z: [B, n, *data_shape]
        check_state_shape("mlp", z, self.n_vars, self.data_shape)
        batch = z.shape[0]
        t = prepare_time(t, batch, z.device)  # [B]
        # emb: [B, hidden]
        emb = self.time_mlp(sinusoidal_embedding(t * self.time_scale, self.time_embed_dim).to(z.dtype))
        # h: [B, hidden]
        h = self.input_proj(z.reshape(batch, self.flat_dim))
        for block in self.blocks:
            h = block(h, emb)
        # out: [B, n * prod(data_shape)] -> [B, n, *data_shape]
        out = self.output_proj(self.out_act(self.out_norm(h)))
        return out.reshape(z.shape)
