"""Rotary position embeddings, with the scaling variants Llama-family checkpoints use."""
from __future__ import annotations

import math

import torch

from outrider.runtime.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [head_dim/2] (float64) and the attention scaling factor for cos/sin."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if s.kind == "default":
        return inv, 1.0
    if s.kind == "linear":
        return inv / s.factor, 1.0
    if s.kind == "llama3":
        return _llama3(inv, s), 1.0
    if s.kind == "yarn":
        return _yarn(inv, head_dim, theta, s)
    raise ValueError(f"unknown rope scaling {s.kind!r}")


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv / s.factor) * (1 - extrapolation) + inv * extrapolation
    attention_factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv, attention_factor


class Rotary:
    """cos/sin tables for positions 0..max_positions-1, applied HF-style (rotate_half)."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device | str = "cpu"):
        inv, factor = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        angles = torch.cat([angles, angles], dim=-1)  # [positions, head_dim]
        self.cos = (angles.cos() * factor).float().to(device)
        self.sin = (angles.sin() * factor).float().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions ([rows, 1, head_dim] in dtype), gathered once per forward."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [rows, heads, head_dim] rotated by the tables from `tables`."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
