"""liere: LieRE and the rotary position-encoding family behind one interface.

pe = LieRE(head_dim=64, num_axes=2, num_heads=12, depth=12, block_size=8)
rot = pe(Grid((14, 14)))                      # Rotations for every layer, head and position
q, k = rot[layer].apply(q), rot[layer].apply(k)
"""

from liere.absolute import LearnedAbsolute, NoPE, SinCosAbsolute
from liere.attention import rotary_attention
from liere.comrope import ComRoPE
from liere.coords import Grid, grid_coords
from liere.encoding import PositionEncoding
from liere.expm import skew_expm, skew_expm_progression
from liere.extension import ExtendedEncoding, extend
from liere.factory import EncodingInfo, available, build, encoding_info, register
from liere.frozen import freeze, unfreeze
from liere.lie import LieRE
from liere.multimodal import multimodal_positions
from liere.rope import AxialRoPE, RoPE, RoPEMixed
from liere.rope_basis import RoPEBasis
from liere.rotations import Rotations
from liere.scaling import scaled_frequencies
from liere.string_pe import CayleySTRING, CirculantSTRING
from liere.visionllama import VisionLlamaRoPE
from liere.weight_decay import no_weight_decay_names

__all__ = [
    "AxialRoPE",
    "CayleySTRING",
    "CirculantSTRING",
    "ComRoPE",
    "EncodingInfo",
    "ExtendedEncoding",
    "Grid",
    "LearnedAbsolute",
    "LieRE",
    "NoPE",
    "PositionEncoding",
    "RoPE",
    "RoPEBasis",
    "RoPEMixed",
    "Rotations",
    "SinCosAbsolute",
    "VisionLlamaRoPE",
    "available",
    "build",
    "encoding_info",
    "extend",
    "freeze",
    "grid_coords",
    "multimodal_positions",
    "no_weight_decay_names",
    "register",
    "rotary_attention",
    "scaled_frequencies",
    "skew_expm",
    "skew_expm_progression",
    "unfreeze",
]
