"""Models that take any ``liere`` encoding: ViT (2D/3D) and a char-level decoder LM.

Adapters for timm and x-transformers models live in the library: ``liere.integrations``.
"""

from models.lm import LM_SIZES, CharLM
from models.vit import VIT_SIZES, ViT

__all__ = ["LM_SIZES", "VIT_SIZES", "CharLM", "ViT"]
