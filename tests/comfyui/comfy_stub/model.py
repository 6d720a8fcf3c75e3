"""A tiny diffusion transformer that calls attention every way real ComfyUI models do.

Per block: self-attention in the default layout ([b, n, h·d], SD/SDXL style); self-attention with
skip_reshape + skip_output_reshape and a custom `scale` (Flux/Wan style, `heads=` as a keyword); GQA with
`enable_gqa=True`; cross-attention with a boolean text-padding mask passed positionally; and a call that
passes `low_precision_attention=False` (Wan I2V image cross-attention style). All through
`attention.optimized_attention`, the global default, with `transformer_options`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention


class TinyDiT(nn.Module):
    def __init__(self, channels=64, heads=2, context_dim=16, blocks=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads, self.head_dim = heads, channels // heads
        self.blocks = blocks

        def weight(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) * shape[-1] ** -0.5, requires_grad=False)

        self.qkv = nn.ParameterList([weight(3 * channels, channels) for _ in range(blocks)])
        self.kv_gqa = nn.ParameterList([weight(2 * self.head_dim, channels) for _ in range(blocks)])
        self.kv_ctx = nn.ParameterList([weight(2 * channels, context_dim) for _ in range(blocks)])
        self.out = nn.ParameterList([weight(channels, 5 * channels) for _ in range(blocks)])
        self.time = weight(channels, 1)

    def forward(self, x, t, context=None, transformer_options=None):
        to = transformer_options if transformer_options is not None else {}
        attn = attention.optimized_attention
        b, n, c = x.shape
        h, d = self.heads, self.head_dim
        mask = torch.ones(b, n, context.shape[1], dtype=torch.bool)
        mask[:, :, -1] = False  # the last text token is padding
        x = x + (t.reshape(-1, 1, 1).to(x.dtype) @ self.time.T.to(x.dtype)).expand(b, n, c)
        for i in range(self.blocks):
            q, k, v = (x @ self.qkv[i].T.to(x.dtype)).chunk(3, dim=-1)
            a = attn(q, k, v, h, transformer_options=to)
            qh, kh, vh = (z.unflatten(-1, (h, d)).transpose(1, 2) for z in (q, k, v))
            bh = attn(
                qh,
                kh,
                vh,
                heads=h,
                skip_reshape=True,
                skip_output_reshape=True,
                scale=0.5 / d**0.5,
                transformer_options=to,
            )
            bh = bh.transpose(1, 2).flatten(2)
            kg, vg = (z.unflatten(-1, (1, d)).transpose(1, 2) for z in (x @ self.kv_gqa[i].T.to(x.dtype)).chunk(2, -1))
            gq = attn(qh, kg, vg, h, skip_reshape=True, enable_gqa=True, transformer_options=to)
            kc, vc = (context.to(x.dtype) @ self.kv_ctx[i].T.to(x.dtype)).chunk(2, dim=-1)
            cr = attn(q, kc, vc, h, mask, transformer_options=to)
            lp = attn(q, kc, vc, h, transformer_options=to, low_precision_attention=False)
            x = x + torch.cat([a, bh, gq, cr, lp], dim=-1) @ self.out[i].T.to(x.dtype)
        return x
