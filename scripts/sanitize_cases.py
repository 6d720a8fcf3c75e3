"""Small shapes of every compiled variant, for `compute-sanitizer --tool memcheck python scripts/sanitize_cases.py`
(and racecheck).

Calls the op directly so the INT4 variants run too (the dispatcher sends INT4 to INT8 where INT4 is emulated),
the key-mask variants (INT8 Q·Kᵀ), and the wgmma variants where the GPU is sm_90. `--family sm90` runs
those only.
"""

import itertools
import sys

import torch

import comfy_sage.api  # noqa: F401  (loads the ops)
from comfy_sage import capability, ops
from comfy_sage.testing import make_qkv

assert capability.kernel_status().loaded, capability.kernel_status().reason
only_sm90 = "--family" in sys.argv and sys.argv[sys.argv.index("--family") + 1] == "sm90"
cases = []
if not only_sm90:
    variants = itertools.product((8, 4), (64, 128, 256), ("fp8", "fp16", "int8"))
    cases += [(80, bits, d, pv) for bits, d, pv in variants if bits == 8 or pv != "int8"]  # INT8 P·V: INT8 Q·Kᵀ
if capability.kernels_run_on(torch.device("cuda"), "sm90"):
    cases += [(90, 8, d, pv) for d in (64, 128) for pv in ("fp8", "int8")]
ran = 0
dtypes = (torch.float16, torch.bfloat16)
for (family, bits, d, pv), dtype, causal in itertools.product(cases, dtypes, (False, True)):
    # The wgmma kernel gets more K blocks (700 keys: 6 of 128) than its 4-stage ring holds, so stage reuse
    # is under the sanitizers too; and, without the LSE, K/V of one K block (77 keys), whose statistics the
    # quantization takes in its K/V CTA.
    for seq_kv, lse in ((700, True), (77, False)) if family == 90 else (((70 if causal else 200), True),):
        q, k, v = make_qkv(2, 4, 130, d, heads_kv=2, seq_kv=seq_kv, dtype=dtype, device="cuda")
        args = (q, k, v, 0, bits, ops.PV_CODES[pv], causal, d**-0.5, lse, family)
        out, _ = torch.ops.comfy_sage.attention(*args)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), (family, bits, d, pv, dtype, causal, seq_kv)
        ran += 1
        if bits == 8 and not causal:  # the key-mask variants: a bias row per batch entry
            keep = torch.rand(2, 1, 1, seq_kv, device="cuda") > 0.3
            keep[..., 0] = True
            out, _ = torch.ops.comfy_sage.attention(*args, ops.key_bias(keep, 2, seq_kv))
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), (family, bits, d, pv, dtype, "key mask", seq_kv)
            ran += 1
print(f"sanitize cases ran: {ran} variants")
