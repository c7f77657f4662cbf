"""The library's one precision policy, used by the encodings, ``Rotations`` and ``rotary_attention``.

- **Building** rotations (frequencies, generators, exponentials) runs in ``build_dtype`` of the coordinates
  (fp32, or fp64 for fp64 coordinates) with autocast disabled (``building``), whatever the model's dtype:
  bf16 angles or generators lose the position (an angle of 4096 rad is off by 16 rad in bf16).
- Fixed frequency tables stay fp32 when the model is cast (``PositionEncoding._apply``).
- **Applying** rotations to ``x`` runs in ``apply_dtype``: the promotion of ``x``'s and the rotations' dtypes
  (fp32 for bf16 activations), except that under autocast block rotations are multiplied in the autocast dtype
  like any matmul (fp64 stays fp64); the result has ``x``'s dtype. ``rotary_attention`` casts block rotations
  to that dtype once for both q and k.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def build_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which rotations are built from coordinates of ``dtype``: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def building(device_type: str) -> AbstractContextManager:
    """Context in which rotations are built: autocast disabled on ``device_type``."""
    return torch.autocast(device_type=device_type, enabled=False)


def apply_dtype(x_dtype: torch.dtype, rot_dtype: torch.dtype, device_type: str, matmul: bool) -> torch.dtype:
    """Dtype in which rotations of ``rot_dtype`` act on ``x`` of ``x_dtype``: their promotion, or for a matmul
    (``matmul=True``, block rotations) under autocast the autocast dtype unless fp64 is involved."""
    dtype = torch.promote_types(x_dtype, rot_dtype)
    if matmul and torch.is_autocast_enabled(device_type) and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return dtype
