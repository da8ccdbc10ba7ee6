"""DDPM-style U-Net score network for image-shaped MDM states.

z [B, n, C, H, W] is reshaped to [B, n*C, H, W] (all MDM variables become input
channels), processed by a U-Net (Ho et al., 2020) and reshaped back.
Odd spatial sizes are supported (28 -> 14 -> 7 -> 4): downsampling uses a
stride-2 conv (ceil halving) and upsampling interpolates to the exact size of the
matching skip connection.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdmsearch.nets.embeddings import check_state_shape, prepare_time, sinusoidal_embedding
from mdmsearch.nets.registry import register_network


def num_groups_for(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm group count: min(max_groups, channels // min_group_size), rounded down to a divisor.

    Groups keep at least ``min_group_size`` channels where possible: with one channel
    per group, GroupNorm removes any per-channel shift, which would cancel the additive
    time-embedding injection of :class:`ResBlock`.
    """
    groups = max(1, min(max_groups, channels // min_group_size))
    while channels % groups != 0:
        groups -= 1
    return groups


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels, max_groups), channels, eps=1e-6)


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _broadcast_to(emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """View per-(sample, channel) values emb [B, C] as [B, C, 1, ..., 1] matching h's rank."""
    return emb.view(emb.shape[0], -1, *([1] * (h.dim() - 2)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, max_groups: int
    ) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, max_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch, max_groups)
        self.dropout = nn.Dropout(dropout)
        # DDPM zero-initialises the last conv of each residual branch.
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: [B, in_ch, H, W], emb: [B, emb_dim]
        h = self.conv1(self.act(self.norm1(x)))  # [B, out_ch, H, W]
        h = h + _broadcast_to(self.emb_proj(self.act(emb)), h)  # [B, out_ch] -> [B, out_ch, 1, 1]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))  # [B, out_ch, H, W]
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions, residual, zero-init output."""

    def __init__(self, channels: int, num_heads: int, max_groups: int) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"unet: {channels} channels not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(channels, max_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]
        b, c, height, width = x.shape
        heads = self.num_heads
        # qkv: [B, 3C, H, W] -> [B, 3, heads, C/heads, H*W]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, heads, c // heads, height * width)
        # q, k, v: [B, heads, H*W, C/heads]
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
        # out: [B, heads, H*W, C/heads] -> [B, C, H, W]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: H -> ceil(H / 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to an explicit size, then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # x: [B, C, h, w] -> [B, C, *size]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@register_network("unet")
class UNetScoreNet(nn.Module):
    """Noise-prediction U-Net: z [B, n, C, H, W], t [B] -> eps_hat [B, n, C, H, W].

    Args (besides n_vars, data_shape = (C, H, W)):
        base_channels: channels of the first level.
        channel_mult: per-level channel multipliers; len(channel_mult) levels.
        num_res_blocks: residual blocks per level on the way down (+1 on the way up).
        attn_resolutions: spatial sizes (min(H, W) of a level) that get self-attention.
        mid_attention: self-attention between the two middle residual blocks.
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
        max_groups: upper bound for GroupNorm groups.
        time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding.
    """

    def __init__(
        self,
        *,
        n_vars: int,
        data_shape: tuple[int, ...],
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        mid_attention: bool,
        num_heads: int,
        dropout: float,
        max_groups: int,
        time_scale: float,
    ) -> None:
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"unet: data_shape must be (C, H, W), got {tuple(data_shape)}")
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult:
            raise ValueError("unet: channel_mult must be non-empty")
        self.n_vars = int(n_vars)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.time_scale = float(time_scale)
        self.base_channels = int(base_channels)
        attn_resolutions = {int(r) for r in attn_resolutions}
        c_data, height, width = self.data_shape
        in_ch = self.n_vars * c_data
        ch = self.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Spatial size of each level (stride-2 conv with padding 1 gives ceil(s / 2)).
        sizes = [(height, width)]
        for _ in range(len(channel_mult) - 1):
            h_prev, w_prev = sizes[-1]
            sizes.append(((h_prev + 1) // 2, (w_prev + 1) // 2))
        self.level_sizes = tuple(sizes)
        self.attn_levels = tuple(i for i, s in enumerate(sizes) if min(s) in attn_resolutions)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, float(dropout), int(max_groups))

        def attn(c: int, use: bool) -> nn.Module:
            return AttnBlock(c, int(num_heads), int(max_groups)) if use else nn.Identity()

        cur, skip_chs = self._build_down(ch, channel_mult, num_res_blocks, res, attn)
        self.mid_block1 = res(cur, cur)
        self.mid_attn = attn(cur, mid_attention)
        self.mid_block2 = res(cur, cur)
        cur = self._build_up(ch, cur, skip_chs, channel_mult, num_res_blocks, res, attn)

        self.norm_out = _norm(cur, int(max_groups))
        self.act = nn.SiLU()
        # Zero-initialised so eps_hat starts at 0 (standard DDPM practice).
        self.conv_out = _zero_(nn.Conv2d(cur, in_ch, 3, padding=1))

    def _build_down(self, ch, channel_mult, num_res_blocks, res, attn) -> tuple[int, list[int]]:
        """Down path; returns the last width and the channels of every tensor pushed on the skip stack."""
        self.down_blocks, self.down_attns, self.downsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skip_chs, cur = [ch], ch
        for level, mult in enumerate(channel_mult):
            out, use_attn = ch * mult, level in self.attn_levels
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res(cur, out))
                attns.append(attn(out, use_attn))
                cur = out
                skip_chs.append(cur)
            self.down_blocks.append(blocks)
            self.down_attns.append(attns)
            if level != len(channel_mult) - 1:
                self.downsamplers.append(Downsample(cur))
                skip_chs.append(cur)
        return cur, skip_chs

    def _build_up(self, ch, cur, skip_chs, channel_mult, num_res_blocks, res, attn) -> int:
        """Up path (levels in reverse order; up_blocks[0] is the deepest level); consumes skip_chs."""
        self.up_blocks, self.up_attns, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            out, use_attn = ch * channel_mult[level], level in self.attn_levels
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(res(cur + skip_chs.pop(), out))
                attns.append(attn(out, use_attn))
                cur = out
            self.up_blocks.append(blocks)
            self.up_attns.append(attns)
            if level != 0:
                self.upsamplers.append(Upsample(cur))
        if skip_chs:
            raise AssertionError("unet: skip bookkeeping mismatch")
        return cur

    def forward(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        # z: [B, n, C, H, W]
        check_state_shape("unet", z, self.n_vars, self.data_shape)
        batch = z.shape[0]
        t = prepare_time(t, batch, z.device)  # [B]
        # emb: [B, 4 * base_channels]
        emb = self.time_mlp(sinusoidal_embedding(t * self.time_scale, self.base_channels).to(z.dtype))

        # x: [B, n*C, H, W]
        x = z.reshape(batch, -1, *z.shape[3:])
        h = self.conv_in(x)  # [B, ch, H, W]
        hs = [h]
        for level, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attns)):
            for block, attn in zip(blocks, attns):
                h = attn(block(h, emb))  # [B, ch*mult, H_l, W_l]
                hs.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)  # [B, ch*mult, H_{l+1}, W_{l+1}]
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)

        for i, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attns)):
            for block, attn in zip(blocks, attns):
                # cat: [B, cur + skip_ch, H_l, W_l]
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if i < len(self.upsamplers):
                # Resize to the next skip's exact size (handles 7 -> 14, 4 -> 7).
                h = self.upsamplers[i](h, hs[-1].shape[-2:])

        # out: [B, n*C, H, W] -> [B, n, C, H, W]
        out = self.conv_out(self.act(self.norm_out(h)))
        return out.reshape(z.shape)
