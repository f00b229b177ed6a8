"""Model loading: Stable Diffusion (`sd`) and CLIP (`clip`) from a preset, a Hub id or a folder."""

from datadream.config import cache_root

__all__ = ["cache_root"]
