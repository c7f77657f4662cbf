"""The RoPE family: 1D RoPE, axial RoPE for 2D/3D grids and RoPE-Mixed (learned mixed frequencies)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from liere.coords import Progression
from liere.encoding import LearnedEncoding, PositionEncoding, check_positive_float, check_positive_int, resolve_rot_dim
from liere.linalg import block_diag, skew_from_params
from liere.rotations import Rotations


def rope_frequencies(rot_dim: int, theta: float, step: int = 2) -> Tensor:
    """``1 / theta ** (arange(0, rot_dim, step) / rot_dim)`` in fp32, as rotary-embedding-torch computes it."""
    return 1.0 / (theta ** (torch.arange(0, rot_dim, step)[: rot_dim // step].float() / rot_dim))


def mixed_width(num_axes: int, name: str) -> tuple[int, str]:
    """What the rotated width of ``mixed_frequencies`` must be a multiple of (2 in 1D, else 4: the pairs come in
    two halves), and why, for the error message of encoding ``name``."""
    if num_axes == 1:
        return 2, f"{name} rotates feature pairs"
    return 4, f"{name}'s mixed frequencies over {num_axes} axes come in two halves of feature pairs"


def mixed_frequencies(
    num_pairs: int, num_axes: int, num_heads: int, depth: int, theta: float, generator: torch.Generator | None = None
) -> Tensor:
    """Initial RoPE-Mixed frequencies, shape ``(depth, num_heads, num_axes, num_pairs)``.

    1 axis: RoPE's ``theta ** (-2j / rot_dim)``. 2 axes: naver-ai/rope-vit's ``init_random_2d_freqs``
    (magnitudes ``theta ** (-4j / rot_dim)`` for each half of the pairs, directions ``phi`` and
    ``phi + pi/2`` with ``phi`` uniform per layer and head). 3+ axes: the same magnitudes along random
    unit directions per layer, head and pair.
    """
    rot_dim = 2 * num_pairs
    if num_axes == 1:
        return rope_frequencies(rot_dim, theta).expand(depth, num_heads, 1, num_pairs).clone()
    if num_pairs % 2:
        raise ValueError(f"mixed frequencies over {num_axes} axes need an even number of pairs, got {num_pairs}")
    mag = rope_frequencies(rot_dim, theta, step=4).repeat(2)  # (pairs,)
    if num_axes == 2:
        phi = torch.rand(depth, num_heads, 1, generator=generator) * 2 * math.pi
        half = torch.zeros(num_pairs)
        half[num_pairs // 2 :] = math.pi / 2
        angle = phi + half  # (depth, heads, pairs)
        direction = torch.stack([angle.cos(), angle.sin()], dim=2)
    else:
        direction = torch.randn(depth, num_heads, num_axes, num_pairs, generator=generator)
        direction = direction / direction.norm(dim=2, keepdim=True)
    return direction * mag


def initial_mixed_frequencies(pe: LearnedEncoding) -> Tensor:
    """``mixed_frequencies`` for every pair of ``pe``'s rotated width, drawn with ``pe``'s seed."""
    gen = pe.init_generator(pe.seed)
    return mixed_frequencies(pe.rot_dim // 2, pe.num_axes, pe.num_heads, pe.depth, pe.theta, gen)


class RoPE(PositionEncoding):
    """Rotary position embedding (Su et al.) for 1D positions, identical to rotary-embedding-torch.

    Pair ``j`` = features ``(2j, 2j+1)`` rotates by ``p * theta ** (-2j / rot_dim)``; features beyond
    ``rot_dim`` pass through. No parameters. rotary-embedding-torch's options, by the same names:

    - ``offset``: positions start at ``offset`` (its ``rotate_queries_or_keys(t, offset=)``);
    - ``interpolate_factor``: positions are divided by it (position interpolation, Chen et al. 2023);
    - ``theta_rescale_factor``: NTK-aware scaling, ``theta * factor ** (rot_dim / (rot_dim - 2))``;
    - ``cache_len``: cos/sin of positions ``0 .. cache_len - 1`` are computed once (fp32 buffers) and sliced
      for coordinates that are consecutive integers inside that range (its ``cache_if_possible``).

    xPos (its ``use_xpos``) scales q and k by inverse factors, which is not a rotation: see ``xpos_scale``.
    The frequencies and the cache stay fp32 when the module is cast.
    """

    fp32_buffers = ("freqs", "cache_cos", "cache_sin")
    uses_progression = True
    stored_settings = (*PositionEncoding.stored_settings, "rot_dim", "theta", "offset", "interpolate_factor")

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        rot_dim: int | None = None,
        *,
        offset: float = 0.0,
        interpolate_factor: float = 1.0,
        theta_rescale_factor: float = 1.0,
        cache_len: int | None = None,
    ) -> None:
        super().__init__(head_dim, num_axes=1)
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, 2, "RoPE rotates feature pairs")
        self.theta = ntk_theta(check_positive_float(theta, "theta"), self.rot_dim, theta_rescale_factor)
        self.offset, self.interpolate_factor = check_position_map(offset, interpolate_factor)
        self.cache_len = None if cache_len is None else check_positive_int(cache_len, "cache_len")
        pairs = self.rot_dim // 2
        self.register_buffer("freqs", torch.empty(pairs), persistent=False)
        self.register_buffer("cache_cos", torch.empty(1, self.cache_len or 0, pairs), persistent=False)
        self.register_buffer("cache_sin", torch.empty(1, self.cache_len or 0, pairs), persistent=False)
        self.reset_parameters()

    def initial_state(self) -> dict[str, Tensor]:
        freqs = rope_frequencies(self.rot_dim, self.theta)
        cached = torch.arange(self.cache_len or 0, dtype=torch.float32)[None, :, None]  # (1, cache_len, 1)
        angles = self.positions(cached)[..., None] * freqs  # (1, cache_len, pairs), as rotations() computes them
        return {"freqs": freqs, "cache_cos": angles.cos(), "cache_sin": angles.sin()}

    def positions(self, coords: Tensor) -> Tensor:
        """The rotated positions ``(coords + offset) / interpolate_factor``, shape ``(S, n)``."""
        p = coords[..., 0]
        if self.offset:
            p = p + self.offset
        return p if self.interpolate_factor == 1.0 else p / self.interpolate_factor

    def cached_rotations(self, coords: Tensor, progression: Progression | None) -> Rotations | None:
        """Rotations sliced from the cache when ``coords`` ``(1, n, 1)`` are the consecutive integers ``start, start +
        1, ...`` (``progression``) inside it, else None."""
        if not self.cache_len or progression is None or coords.dtype != torch.float32 or coords.shape[0] != 1:
            return None
        (start, step), n = progression, coords.shape[1]
        if step != 1.0 or start != int(start) or not 0 <= start <= self.cache_len - n:
            return None
        cos, sin = (t[:, int(start) : int(start) + n][None, :, None] for t in (self.cache_cos, self.cache_sin))
        return Rotations(self.head_dim, cos=cos, sin=sin)

    def rotations(self, coords: Tensor, progression: Progression | None = None) -> Rotations:
        cached = self.cached_rotations(coords, progression)
        if cached is not None:
            return cached
        angles = self.positions(coords)[..., None] * self.freqs.to(coords)  # (S, n, pairs)
        return Rotations.from_angles(angles[None, :, None], self.head_dim)


class AxialRoPE(PositionEncoding):
    """Axial RoPE for 2D/3D grids (rope-vit's ``compute_axial_cis``, VisionLlama-style).

    The rotated pairs are split into ``num_axes`` contiguous groups; group ``a`` rotates by
    ``p_a * theta ** (-2 * num_axes * j / rot_dim)``. ``rot_dim`` defaults to the largest multiple of
    ``2 num_axes`` <= ``head_dim`` (e.g. 60 of 64 features for 3 axes; the rest pass through). No parameters;
    the frequencies ``freqs`` stay fp32 when the module is cast.

    ``sections`` (M-RoPE, Qwen2-VL's ``mrope_section``): pairs per axis; pair ``j`` rotates by
    ``p_a * theta ** (-2j / rot_dim)`` (1D RoPE's frequencies) with ``a`` the axis of its section, and
    ``rot_dim = 2 * sum(sections)``. Positions on the diagonal ``(p, ..., p)`` (text tokens) then get 1D RoPE
    exactly. Transformers rotates the pairs ``(j, j + rot_dim / 2)``, liere ``(2j, 2j + 1)``: the same rotations up
    to that feature permutation.
    """

    fp32_buffers = ("freqs",)
    stored_settings = (*PositionEncoding.stored_settings, "rot_dim", "theta")

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        theta: float = 100.0,
        rot_dim: int | None = None,
        *,
        sections: Sequence[int] | None = None,
    ) -> None:
        super().__init__(head_dim=head_dim, num_axes=num_axes)
        self.sections = None if sections is None else check_sections(sections, num_axes, head_dim, rot_dim)
        if rot_dim is None:
            rot_dim = 2 * sum(self.sections) if self.sections else head_dim - head_dim % (2 * num_axes)
            if rot_dim == 0:
                raise ValueError(f"head_dim={head_dim} is too small: each of the {num_axes} axes needs a feature pair")
        step = 2 if self.sections else 2 * num_axes
        self.rot_dim = resolve_rot_dim(head_dim, rot_dim, step, f"each of the {num_axes} axes rotates pairs")
        self.theta = check_positive_float(theta, "theta")
        self.register_buffer("freqs", torch.empty(self.rot_dim // step), persistent=False)
        self.reset_parameters()

    def initial_state(self) -> dict[str, Tensor]:
        if self.sections:  # M-RoPE: 1D RoPE's frequencies, pair j on the axis of its section
            return {"freqs": rope_frequencies(self.rot_dim, self.theta)}
        return {"freqs": rope_frequencies(self.rot_dim, self.theta, step=2 * self.num_axes)}  # (pairs per axis,)

    def rotations(self, coords: Tensor) -> Rotations:
        if self.sections:
            axis = [a for a, size in enumerate(self.sections) for _ in range(size)]  # the axis of each pair
            angles = coords[..., axis] * self.freqs.to(coords)  # (S, n, pairs)
        else:
            angles = (coords[..., :, None] * self.freqs.to(coords)).flatten(-2)  # (S, n, axes * pairs per axis)
        return Rotations.from_angles(angles[None, :, None], self.head_dim)


def check_sections(sections: Sequence[int], num_axes: int, head_dim: int, rot_dim: int | None) -> tuple[int, ...]:
    """M-RoPE ``sections`` (feature pairs per axis, Qwen2-VL's ``mrope_section``), checked against the widths."""
    sections = tuple(sections)
    if len(sections) != num_axes or not all(isinstance(s, int) and s > 0 for s in sections):
        raise ValueError(f"sections must be {num_axes} positive ints (pairs per axis), got {sections!r}")
    width = 2 * sum(sections)
    if width > head_dim or (rot_dim is not None and rot_dim != width):
        raise ValueError(f"sections {sections} rotate {width} features, but head_dim={head_dim}, rot_dim={rot_dim}")
    return sections


class RoPEMixed(LearnedEncoding):
    """RoPE-Mixed (Heo et al. 2024): learned per-layer, per-head frequencies mixing all axes.

    Pair ``j`` rotates by ``sum_a p_a f[layer, head, a, j]``; ``f`` is initialised by ``mixed_frequencies``.
    Equals LieRE with block size 2.
    """

    def __init__(
        self,
        head_dim: int,
        num_axes: int = 2,
        num_heads: int = 1,
        depth: int = 1,
        theta: float | None = None,
        rot_dim: int | None = None,
        seed: int | None = None,
    ) -> None:
        multiple, why = mixed_width(num_axes, "RoPE-Mixed")
        super().__init__(head_dim, num_axes, num_heads, depth, rot_dim, multiple, why, theta, seed)
        self.freqs = nn.Parameter(torch.empty(depth, num_heads, num_axes, self.rot_dim // 2))
        self.reset_parameters()

    def initial_state(self) -> dict[str, Tensor]:
        return {"freqs": initial_mixed_frequencies(self)}

    def skew_generators(self) -> Tensor:
        """Dense commuting generators ``(depth, num_heads, num_axes, head_dim, head_dim)``: ``[[0, -w], [w, 0]]``."""
        pairs = skew_from_params(self.freqs[..., None], 2)
        return block_diag(pairs, self.head_dim, fill_identity=False)

    def rotations(self, coords: Tensor) -> Rotations:
        angles = torch.einsum("sna,dhap->dshnp", coords, self.freqs.to(coords))
        return Rotations.from_angles(angles, self.head_dim)


# ----------------------------------------------------------------------------------- rotary-embedding-torch options
def check_position_map(offset: float, interpolate_factor: float) -> tuple[float, float]:
    """``(offset, interpolate_factor)`` as floats, after checking they are finite and the factor >= 1."""
    if not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if not isinstance(interpolate_factor, (int, float)) or not interpolate_factor >= 1.0:
        raise ValueError(f"interpolate_factor must be a number >= 1, got {interpolate_factor!r}")
    return float(offset), float(interpolate_factor)


def ntk_theta(theta: float, rot_dim: int, theta_rescale_factor: float = 1.0) -> float:
    """NTK-aware frequency base: ``theta * factor ** (rot_dim / (rot_dim - 2))`` (rotary-embedding-torch)."""
    if not isinstance(theta_rescale_factor, (int, float)) or not theta_rescale_factor > 0:
        raise ValueError(f"theta_rescale_factor must be a number > 0, got {theta_rescale_factor!r}")
    if theta_rescale_factor == 1.0:
        return theta
    if rot_dim <= 2:
        raise ValueError(f"theta_rescale_factor needs rot_dim > 2, got rot_dim={rot_dim}")
    return theta * theta_rescale_factor ** (rot_dim / (rot_dim - 2))


def xpos_scale(positions: Tensor, rot_dim: int, scale_base: float = 512.0, center: float | None = None) -> Tensor:
    """xPos (Sun et al. 2022) scales ``(n, rot_dim)``: rotate, then ``q * scale`` and ``k / scale``.

    ``scale[i, 2j] = scale[i, 2j+1] = zeta_j ** ((p_i - center) / scale_base)`` with
    ``zeta_j = (2j + 0.4 rot_dim) / (1.4 rot_dim)``, so ``q_i . k_j`` decays as ``zeta ** ((p_i - p_j) / base)``.
    ``center`` defaults to ``n // 2`` (rotary-embedding-torch's choice; it cancels in the scores). It is not
    a ``Rotations``: the scale is not orthogonal and differs between q and k, so it is applied beside it.
    """
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1D (n,), got shape {tuple(positions.shape)}")
    zeta = (torch.arange(0, rot_dim, 2, device=positions.device) + 0.4 * rot_dim) / (1.4 * rot_dim)
    center = positions.shape[0] // 2 if center is None else center
    power = (positions.float() - center) / scale_base
    return (zeta ** power[:, None]).repeat_interleave(2, dim=-1)
