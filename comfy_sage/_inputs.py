"""Checking and normalizing the arguments every attention entry point shares.

All entry points (the public API, the reference, the torch ops) accept Q, K, V in either layout:
HND = [batch, heads, tokens, head_dim] or NHD = [batch, tokens, heads, head_dim]. Internally everything
works on HND *views* (a transpose, never a copy); kernels take the strides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("HND", "NHD")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Problem:
    """The sizes of one attention call, layout-independent."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    layout: str

    @property
    def gqa_group(self) -> int:
        """Query heads per key/value head."""
        return self.heads_q // self.heads_kv


def check_layout(tensor_layout: object) -> str:
    if not isinstance(tensor_layout, str) or tensor_layout.upper() not in LAYOUTS:
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD'; got {tensor_layout!r}")
    return tensor_layout.upper()


def check_qkv(q: object, k: object, v: object, tensor_layout: object) -> Problem:
    """Validate Q, K, V; `TypeError`/`ValueError` naming the argument at fault."""
    layout = check_layout(tensor_layout)
    return Problem(*qkv_sizes(q, k, v, layout), layout)


def qkv_sizes(q: object, k: object, v: object, layout: str) -> tuple[int, int, int, int, int, int]:
    """`check_qkv` for a layout already checked, without the `Problem`: (batch, heads_q, heads_kv, seq_q,
    seq_kv, head_dim). Every `sageattn` call runs this, and only a mask or the fallback needs a `Problem`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            shape = "[batch, heads, tokens, head_dim]" if layout == "HND" else "[batch, tokens, heads, head_dim]"
            raise ValueError(f"{name} must be 4-D {shape} for tensor_layout={layout!r}; got shape {tuple(t.shape)}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device; got {q.device}, {k.device}, {v.device}")

    # The sizes by layout, each shape read once (no transposed views: a view costs more than the whole check).
    if layout == "HND":
        (b, hq, nq, d), (kb, hkv, nkv, kd), (vb, vh, vn, vd) = q.shape, k.shape, v.shape
    else:
        (b, nq, hq, d), (kb, nkv, hkv, kd), (vb, vn, vh, vd) = q.shape, k.shape, v.shape
    if kb != b or vb != b:
        raise ValueError(f"q, k and v must have the same batch size; got {b}, {kb}, {vb}")
    if kd != d:
        raise ValueError(f"k must have q's head_dim {d}; got {kd}")
    if vd != d:
        raise ValueError(f"v must have q's head_dim {d}; got {vd}")
    if vh != hkv:
        raise ValueError(f"k and v must have the same number of heads; got {hkv} and {vh}")
    if vn != nkv:
        raise ValueError(f"k and v must have the same number of tokens; got {nkv} and {vn}")
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"q's heads ({hq}) must be a multiple of k's and v's heads ({hkv}) for grouped-query attention"
        )
    if d == 0:
        raise ValueError("head_dim must be at least 1")
    return b, hq, hkv, nq, nkv, d


def check_mask(attn_mask: object, problem: Problem, is_causal: bool, device: torch.device) -> None:
    """A mask must broadcast to [batch, heads_q, seq_q, seq_kv] (whatever the layout), as in PyTorch SDPA."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined; fold the causal mask into attn_mask")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating point; got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask must be on q's device {device}; got {attn_mask.device}")
    full = (problem.batch, problem.heads_q, problem.seq_q, problem.seq_kv)
    shape = tuple(attn_mask.shape)
    ok = 2 <= len(shape) <= 4 and all(s in (1, f) for s, f in zip(reversed(shape), reversed(full), strict=False))
    if not ok:
        raise ValueError(
            f"attn_mask must broadcast to [batch, heads, seq_q, seq_kv] = {list(full)}; got shape {list(shape)}"
        )


def key_mask_rows(attn_mask: torch.Tensor, batch: int, seq_kv: int) -> int | None:
    """For a checked mask that depends on the key alone (the same for every head and query row, as text-padding
    masks are: [B or 1, 1, 1, N_kv], [1, 1, N_kv], [1, N_kv]): its rows, B or 1. None for any other mask. Read
    from the shape only: deciding from the values would cost a GPU synchronization."""
    shape = attn_mask.shape
    if not 1 <= len(shape) <= 4:
        return None
    # [B, H, N_q, N_kv] (H and N_q of 1) or fewer dimensions, broadcast from the right (all but N_kv of 1).
    between = shape[1:-1] if len(shape) == 4 else shape[:-1]
    if seq_kv == 0 or shape[-1] != seq_kv or any(n != 1 for n in between):
        return None
    rows = shape[0] if len(shape) == 4 else 1
    return rows if rows in (1, batch) else None


def check_sm_scale(sm_scale: object, head_dim: int, name: str = "sm_scale") -> float:
    if sm_scale is None:
        return head_dim**-0.5
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None; got {type(sm_scale).__name__}")
    if not float(sm_scale) > 0 or sm_scale == float("inf"):
        raise ValueError(f"{name} must be a positive finite number; got {sm_scale!r}")
    return float(sm_scale)


def check_dropout(dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float; got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be between 0 and 1; got {dropout_p!r}")


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, H, N, D] view of `x`."""
    return x if layout == "HND" else x.transpose(1, 2)


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`x` [B, H, N, D] as the caller's layout (a view)."""
    return x if layout == "HND" else x.transpose(1, 2)


def causal_visible(rows: torch.Tensor, cols: torch.Tensor, seq_q: int, seq_kv: int) -> torch.Tensor:
    """Bottom-right aligned causal visibility: query i sees key j iff j ≤ i + (seq_kv − seq_q)."""
    return cols[None, :] <= rows[:, None] + (seq_kv - seq_q)
