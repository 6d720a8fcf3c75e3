"""Inputs that tests, the demo and the benchmark share.

"normal": standard normal Q, K, V. "biased": what real diffusion layers look like to the quantizer: K with
a large mean per channel (what K smoothing removes) and Q with a few outlier channels on top of a per-channel
offset (what Q smoothing removes). Both in the caller's dtype, device and layout.
"""

from __future__ import annotations

import torch

INPUT_KINDS = ("normal", "biased")
_OUTLIER_EVERY = 16  # one Q channel in 16 carries a large offset
_Q_OUTLIER = 3.0
_K_OFFSET = 4.0


def make_qkv(
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    *,
    kind: str = "normal",
    heads_kv: int | None = None,
    seq_kv: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    layout: str = "HND",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}; got {kind!r}")
    heads_kv = heads if heads_kv is None else heads_kv
    seq_kv = seq if seq_kv is None else seq_kv

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device)

    q = randn(batch, heads, seq, head_dim)
    k = randn(batch, heads_kv, seq_kv, head_dim)
    v = randn(batch, heads_kv, seq_kv, head_dim)
    if kind == "biased":
        # Token norms vary (log-normal), channels carry offsets: per-thread scales and smoothing both matter.
        q = q * torch.exp(0.5 * randn(batch, heads, seq, 1))
        k = k * torch.exp(0.5 * randn(batch, heads_kv, seq_kv, 1))
        q_offset = randn(batch, heads, 1, head_dim)
        q_offset[..., ::_OUTLIER_EVERY] = _Q_OUTLIER * torch.sign(q_offset[..., ::_OUTLIER_EVERY])
        q = q + q_offset
        k = k + _K_OFFSET * randn(batch, heads_kv, 1, head_dim)
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def comfyui_unet_config(config: dict) -> dict:
    """`config` (a ComfyUI diffusion model's unet config, as the tests and scripts/comfyui_e2e.py write them for
    ComfyUI 0.3.60) with the fields that the running ComfyUI requires and older releases reject: Flux's
    `txt_ids_dims` (a required FluxParams field since ComfyUI 0.4), set to [] as ComfyUI's own model detection
    sets it for Flux-dev. Needs ComfyUI importable when the config is Flux's."""
    config = dict(config)
    if config.get("image_model") == "flux":
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {field.name for field in dataclasses.fields(FluxParams)}:
            config.setdefault("txt_ids_dims", [])
    return config
