"""One forward pass of full-size ComfyUI models on this GPU: stock attention against the node's patch.

Builds SD1.5, SDXL, Flux-dev and Wan 2.1 (1.3B, 14B) diffusion models with ComfyUI's own classes
(`supported_models`, `model_base`, `ModelPatcher`) and random weights in bf16, patches each with the "Patch Sage
Attention" node's function in `auto`, and times `apply_model` three ways, interleaved:
- stock: ComfyUI's own attention (PyTorch SDPA on a GPU without xformers);
- kernels: the patch with the kernels at every call (`dispatch.prefer_family("sm90")`, what Hopper's `auto`
  ran before it left calls under 4,096 tokens to PyTorch attention; on other GPUs the same as `auto`);
- auto: the patch as users get it.
Prints seconds per forward (median over rounds, each round the median of --repeat) and the patched output's
relative L2 distance from stock, and writes JSON with --json.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/comfyui_e2e.py [--only SDXL,Wan] [--json out.json]

Needs a CUDA GPU, a ComfyUI checkout (>= 0.3.60) with its requirements, and this package importable (the
extension built or installed). Wan 2.1 14B needs ~40 GB of GPU memory and ~12 s a forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip
SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip
FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)  # fmt: skip
WAN_1_3B = dict(
    image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960,
    freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30, eps=1e-6,
)  # fmt: skip
WAN_14B = dict(WAN_1_3B, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated parts of model names to run (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="forwards per round and way (median)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="forwards per way before the rounds")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    for name in ("repeat", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, os.path.abspath(os.environ["COMFYUI_PATH"]))
    sys.argv = sys.argv[:1]  # ComfyUI parses the command line when its options module is imported
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import comfy.model_patcher
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.supported_models as sm

    from comfy_sage import comfyui, dispatch
    from comfy_sage.testing import comfyui_unet_config

    dev, bf16 = torch.device("cuda"), torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=bf16)

    def build(config_cls, unet_config):
        config = config_cls(comfyui_unet_config(unet_config))
        config.set_inference_dtype(bf16, None)
        model = config.get_model({}, device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                if p.dim() >= 2:
                    p.normal_(generator=gen).mul_(p[0].numel() ** -0.5)
                else:
                    p.normal_(generator=gen).mul_(0.1).add_(1)
        return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)

    def flux_inputs(latent):
        guidance = torch.tensor([3.5], device=dev)
        return dict(x=randn(1, 16, latent, latent), context=randn(1, 512, 4096), y=randn(1, 768), guidance=guidance)

    models = [  # (name, ComfyUI model class, its config, the inputs of one forward)
        ("SD1.5 512², batch 2", sm.SD15, SD15, lambda: dict(x=randn(2, 4, 64, 64), context=randn(2, 77, 768))),
        ("SDXL 1024², batch 2", sm.SDXL, SDXL,
         lambda: dict(x=randn(2, 4, 128, 128), context=randn(2, 77, 2048), y=randn(2, 2816))),
        ("Flux-dev 768²", sm.Flux, FLUX_DEV, lambda: flux_inputs(96)),
        ("Flux-dev 1024²", sm.Flux, FLUX_DEV, lambda: flux_inputs(128)),
        ("Wan 2.1 1.3B 480p, 81 frames", sm.WAN21_T2V, WAN_1_3B,
         lambda: dict(x=randn(1, 16, 21, 60, 104), context=randn(1, 512, 4096))),
        ("Wan 2.1 14B 720p, 81 frames", sm.WAN21_T2V, WAN_14B,
         lambda: dict(x=randn(1, 16, 21, 90, 160), context=randn(1, 512, 4096))),
    ]  # fmt: skip
    wanted = [w.strip() for w in args.only.split(",")] if args.only else None
    hooks = comfyui.ComfyHooks.from_comfy()

    def forward(model, inputs):
        inputs = dict(inputs)
        x, context = inputs.pop("x"), inputs.pop("context")
        options = dict(model.model_options["transformer_options"])
        with torch.inference_mode():
            t = torch.tensor([0.7], device=dev)
            return model.model.apply_model(x, t, c_crossattn=context, transformer_options=options, **inputs)

    def timed(model, inputs, family, n):
        times, out = [], None
        with dispatch.prefer_family(family):
            for _ in range(n):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = forward(model, inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return statistics.median(times), out

    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; seconds per forward, median of {args.rounds} rounds (each the median of {args.repeat}), "
          "and the spread of the rounds")  # fmt: skip
    print(f"{'model':<32}{'stock':>18}{'kernels':>18}{'auto':>18}   auto vs stock")
    results, built = [], {}
    for name, config_cls, config, make_inputs in models:
        if wanted and not any(w in name for w in wanted):
            continue
        key = (config_cls.__name__, config.get("dim"))
        if key not in built:
            built.clear()
            torch.cuda.empty_cache()
            built[key] = build(config_cls, config)
        base = built[key]
        patched = comfyui.execute_patch(base, "auto", hooks=hooks)
        inputs = make_inputs()
        ways = {"stock": (base, None), "kernels": (patched, "sm90"), "auto": (patched, None)}
        for model, family in ways.values():
            for _ in range(args.warmup):
                timed(model, inputs, family, 1)
        seconds = {way: [] for way in ways}
        outputs = {}
        for _ in range(args.rounds):
            for way, (model, family) in ways.items():
                s, outputs[way] = timed(model, inputs, family, args.repeat)
                seconds[way].append(s)
        stock = outputs["stock"].double()
        rel_l2 = float((outputs["auto"].double() - stock).norm() / stock.norm())
        row = {"model": name, "seconds": seconds, "auto_rel_l2_vs_stock": rel_l2}
        results.append(row)
        cells = "".join(f"{statistics.median(s):>11.4f} ±{(max(s) - min(s)) / 2:.4f}" for s in seconds.values())
        speedup = statistics.median(seconds["stock"]) / statistics.median(seconds["auto"])
        print(f"{name:<32}{cells}   {speedup:.3f}×, rel L2 {rel_l2:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
