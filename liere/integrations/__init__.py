"""Integrations with peer libraries, each importing its peer lazily (only when its module is imported):

- ``liere.integrations.timm``: ``liere_timm_vit`` puts any encoding into a timm ``VisionTransformer``;
- ``liere.integrations.x_transformers``: ``liere_x_transformers`` does the same for an x-transformers decoder.
"""
