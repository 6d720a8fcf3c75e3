"""comfy_sage: SageAttention2 low-bit attention (INT8/INT4 Q·Kᵀ, FP8/FP16 P·V) with a PyTorch fallback."""

from .api import sageattn
from .modes import Mode

__version__ = "0.1.0.dev0"

__all__ = ["Mode", "__version__", "sageattn"]
