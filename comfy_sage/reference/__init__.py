"""The pure-PyTorch SageAttention2 that quantizes exactly like the kernels: every kernel test's oracle.

`sageattn` is the quantized attention; `exact.attention` is float64 softmax(Q·Kᵀ)·V, the ground truth for
accuracy; `layout` states the tensor-core fragment layouts the per-thread groups follow.
"""

from . import exact, layout, quant
from .attention import sageattn
from .exact import accuracy, cosine_similarity, relative_l1
from .quant import Granularity

__all__ = ["Granularity", "accuracy", "cosine_similarity", "exact", "layout", "quant", "relative_l1", "sageattn"]
