"""Real ComfyUI model classes through the node pack, against stock ComfyUI attention (CPU).

Run by test_comfyui_real.py with a ComfyUI checkout's Python: `python real_comfyui_models.py PACK_DIR`, with
COMFYUI_PATH set. Builds Flux, Wan 2.1 and an SDXL UNet from tiny random configs through ComfyUI's own
supported_models / model_base / ModelPatcher, loads the pack the way ComfyUI loads custom nodes, patches
through the node class, and prints one JSON object of measurements for the test to judge:
- forward passes (`apply_model`), stock vs patched: on this CPU the patch falls back to ComfyUI's
  attention_pytorch; with stand-in kernels (exact, then the reference's INT8+FP8) the kernel path runs on
  every call site's real layout;
- full sampler runs (`comfy.sample.sample`): stock vs patched, the precision schedule seen by the calls, and
  a recovered NaN step.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    pack_dir = os.path.abspath(sys.argv[1])
    comfy_dir = os.path.abspath(os.environ["COMFYUI_PATH"])
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fake_kernels
    import torch

    cuda = torch.cuda.is_available() and os.environ.get("COMFY_SAGE_REAL_CPU_ONLY") != "1"
    sys.argv = [sys.argv[0]] + ([] if cuda else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    from comfy.ldm.modules import attention as comfy_attention

    spec = importlib.util.spec_from_file_location(
        "custom_nodes_comfy_sage", os.path.join(pack_dir, "__init__.py"), submodule_search_locations=[pack_dir]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    from fake_kernels import FakeKernels

    from comfy_sage import comfyui
    from comfy_sage.testing import comfyui_unet_config

    if hasattr(pack, "comfy_entrypoint"):
        nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
        patch_node = next(n for n in nodes if n.GET_SCHEMA().node_id == comfyui.PATCH_NODE_ID)

        def patch(model, **options):
            return patch_node.execute(model=model, **options).args[0]

        api = "v3"
    else:
        patch_cls = pack.NODE_CLASS_MAPPINGS[comfyui.PATCH_NODE_ID]

        def patch(model, **options):
            return patch_cls().patch(model, **options)[0]

        api = "v1"

    def build(config_cls, unet_config, dtype=torch.float32, device="cpu", seed=0):
        """A ComfyUI model from `unet_config` with seeded random weights (the same values for every dtype)."""
        config = config_cls(comfyui_unet_config(unet_config))
        config.set_inference_dtype(dtype, None)
        device = torch.device(device)
        model = config.get_model({}, device=device)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
                else:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))

    configs = {  # tiny, with the real models' head dims: Flux and Wan 128, SDXL 64
        "flux": (comfy.supported_models.Flux, dict(
            image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=256,
            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True)),
        "wan": (comfy.supported_models.WAN21_T2V, dict(
            image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=256,
            ffn_dim=512, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2)),
        "sdxl": (comfy.supported_models.SDXL, {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 64, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
            "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 32,
            "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False,
            "use_temporal_resblock": False}),
    }  # fmt: skip

    def make_specs(dtype=torch.float32, device="cpu", latent=16):
        gen = torch.Generator().manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device)

        pooled = randn(1, 1280)
        return {
            "flux": dict(
                model=build(*configs["flux"], dtype, device),
                x=randn(1, 16, latent, latent),
                context=randn(1, 8, 32),
                extra=dict(y=randn(1, 32), guidance=torch.tensor([3.5], device=device)),
                cond=lambda e: {"pooled_output": e["y"], "guidance": 3.5},
            ),
            "wan": dict(
                model=build(*configs["wan"], dtype, device),
                x=randn(1, 16, 3, latent // 2, latent // 2),
                context=randn(1, 8, 32),
                extra={},
                cond=lambda e: {},
            ),
            "sdxl": dict(
                model=build(*configs["sdxl"], dtype, device),
                x=randn(1, 4, latent, latent),
                context=randn(1, 8, 32),
                extra=dict(y=randn(1, 2816)),
                cond=lambda e: {"pooled_output": pooled, "width": 128, "height": 128},
            ),
        }

    specs = make_specs()

    def counting(model):
        """Wrap the patched model's override to count calls and record each call's step mode."""
        options = model.model_options["transformer_options"]
        override = options[comfyui.OVERRIDE_KEY]
        seen = {"calls": 0, "modes": []}

        def wrapper(func, *args, **kwargs):
            seen["calls"] += 1
            state = (kwargs.get("transformer_options") or {}).get(comfyui.STATE_KEY)
            if state is not None and (not seen["modes"] or seen["modes"][-1] != state.mode.value):
                seen["modes"].append(state.mode.value)
            return override(func, *args, **kwargs)

        options[comfyui.OVERRIDE_KEY] = wrapper
        return override, seen

    def forward(model, spec):
        with torch.inference_mode():
            t = torch.tensor([0.7], device=spec["x"].device)
            options = dict(model.model_options["transformer_options"])
            return model.model.apply_model(
                spec["x"], t, c_crossattn=spec["context"], transformer_options=options, **spec["extra"]
            )

    @torch.inference_mode()  # as ComfyUI executes a prompt
    def run_sampler(model, spec, steps=4, seed=3):
        noise = torch.randn(spec["x"].shape, generator=torch.Generator().manual_seed(seed))
        positive = [[spec["context"].cpu(), spec["cond"](spec["extra"])]]
        negative = [[torch.zeros_like(spec["context"]).cpu(), spec["cond"](spec["extra"])]]
        return comfy.sample.sample(
            model,
            noise,
            steps,
            1.0,
            "euler",
            "simple",
            positive,
            negative,
            torch.zeros_like(spec["x"]),
            seed=seed,
            disable_pbar=True,
        )

    results = {
        "api": api,
        "v3_available": importlib.util.find_spec("comfy_api") is not None and _importable("comfy_api.latest"),
        "optimized_attention": comfy_attention.optimized_attention.__name__,
    }
    original_plan, original_sageattn = comfyui.dispatch.plan, comfyui.sageattn

    def restore():
        comfyui.dispatch.plan, comfyui.sageattn = original_plan, original_sageattn

    for name, spec in specs.items():
        base = spec["model"]
        r = results[name] = {}
        stock = forward(base, spec)
        r["stock_finite"] = bool(torch.isfinite(stock).all())

        patched = patch(base, mode="auto", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=True)
        override, seen = counting(patched)
        r["fallback_rel"] = rel(forward(patched, spec), stock)
        r["fallback_calls"] = seen["calls"]
        r["fallback_reasons"] = sorted(override.reporter._seen)
        r["input_untouched"] = comfyui.OVERRIDE_KEY not in base.model_options["transformer_options"]
        r["bypassed_rel"] = rel(forward(base, spec), stock)

        for kind in ("exact", "quantized"):
            fake = FakeKernels(quantized=kind == "quantized").install()
            try:
                patched = patch(base, mode="int8+fp8", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=True)
                r[f"{kind}_rel"] = rel(forward(patched, spec), stock)
                r[f"{kind}_kernel_calls"] = len(fake.calls)
                r[f"{kind}_layouts"] = sorted({c["layout"] for c in fake.calls})
                r[f"{kind}_head_shapes"] = sorted({str(c["q"]) for c in fake.calls})
            finally:
                restore()

        if name == "sdxl":
            continue
        stock_samples = run_sampler(base, spec)
        patched = patch(base, mode="auto", edge_steps=1, edge_mode="int8+fp16", nonfinite_guard=True)
        r["sampling_fallback_rel"] = rel(run_sampler(patched, spec), stock_samples)
        fake = FakeKernels().install()
        try:
            patched = patch(base, mode="int8+fp8", edge_steps=1, edge_mode="int8+fp16", nonfinite_guard=True)
            _, seen = counting(patched)
            r["sampling_kernel_rel"] = rel(run_sampler(patched, spec), stock_samples)
            r["sampling_step_modes"] = seen["modes"]
            patched = patch(base, mode="int8+fp8", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=True)
            fake.poison = 1
            poisoned = run_sampler(patched, spec)
            r["nan_recovered_finite"] = bool(torch.isfinite(poisoned).all())
            r["nan_recovered_rel"] = rel(poisoned, stock_samples)
            unguarded = patch(base, mode="int8+fp8", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=False)
            fake.poison = 1
            r["unguarded_has_nan"] = bool(torch.isnan(run_sampler(unguarded, spec)).any())
        finally:
            restore()
    if cuda:
        results["cuda"] = measure_kernels(torch, comfyui, make_specs, patch, forward, run_sampler)
    print("RESULTS " + json.dumps(results))


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def measure_kernels(torch, comfyui, make_specs, patch, forward, run_sampler) -> dict:
    """The real kernels on this GPU: bf16 models through each mode against stock attention in fp32 and bf16."""
    from comfy_sage import capability

    status = capability.kernel_status()
    out = {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
        "kernels_loaded": status.loaded,
        "kernels_reason": status.reason,
    }
    real_sageattn, calls = comfyui.sageattn, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real_sageattn(*args, **kwargs)

    comfyui.sageattn = counted
    try:
        ref, bf16 = make_specs(torch.float32, "cuda", latent=32), make_specs(torch.bfloat16, "cuda", latent=32)
        for name, spec in bf16.items():
            stock32, stock16 = forward(ref[name]["model"], ref[name]), forward(spec["model"], spec)
            m = out[name] = {"bf16_stock_rel_fp32": rel(stock16, stock32)}
            for mode in ("auto", "int8+fp8", "int8+fp16", "int4+fp8", "int8+int8", "off (PyTorch)"):
                calls[0] = 0
                patched = patch(spec["model"], mode=mode, edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=True)
                o = forward(patched, spec)
                reporter = patched.model_options["transformer_options"][comfyui.OVERRIDE_KEY].reporter
                m[mode] = {"rel_fp32": rel(o, stock32), "rel_bf16": rel(o, stock16), "kernel_calls": calls[0],
                           "fallbacks": sorted(reporter._seen), "finite": bool(torch.isfinite(o).all())}  # fmt: skip
            if name != "sdxl":
                stock_samples = run_sampler(spec["model"], spec)
                patched = patch(spec["model"], mode="auto", edge_steps=1, edge_mode="int8+fp16", nonfinite_guard=True)
                calls[0] = 0
                m["sampling_rel_bf16"] = rel(run_sampler(patched, spec), stock_samples)
                m["sampling_kernel_calls"] = calls[0]
    finally:
        comfyui.sageattn = real_sageattn
    return out


if __name__ == "__main__":
    main()
