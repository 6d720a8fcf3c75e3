"""Bad input gets a ValueError or TypeError that names the argument at fault."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_sage import sageattn
from comfy_sage._inputs import Problem, causal_visible, check_qkv, check_sm_scale, key_mask_rows

pytestmark = pytest.mark.filterwarnings("ignore")


def qkv(b=1, hq=4, hkv=4, nq=16, nkv=16, d=64, dtype=torch.bfloat16, layout="HND"):
    def make(h, n):
        shape = (b, h, n, d) if layout == "HND" else (b, n, h, d)
        return torch.zeros(shape, dtype=dtype)

    return make(hq, nq), make(hkv, nkv), make(hkv, nkv)


def test_valid_inputs_pass():
    q, k, v = qkv(b=2, hq=8, hkv=2, nq=10, nkv=20, d=80)
    assert check_qkv(q, k, v, "HND") == Problem(2, 8, 2, 10, 20, 80, "HND")
    q, k, v = qkv(b=2, hq=8, hkv=2, nq=10, nkv=20, d=80, layout="NHD")
    assert check_qkv(q, k, v, "NHD") == Problem(2, 8, 2, 10, 20, 80, "NHD")
    assert check_qkv(q, k, v, "nhd").layout == "NHD"  # the layout name is case-insensitive


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_tensor(name):
    args = dict(zip("qkv", qkv(), strict=True))
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor; got list"):
        sageattn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("rank", [3, 5])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_wrong_rank(name, rank, layout):
    """One tensor of another rank than the others. In HND, SDPA's layout, q of 3 or more dimensions is taken
    (as SDPA takes it), so the error there names all three shapes."""
    args = dict(zip("qkv", qkv(layout=layout), strict=True))
    args[name] = args[name].flatten(0, 1) if rank == 3 else args[name][None]
    if layout == "HND" and name == "q":
        match = r"^q, k and v must have the same number of dimensions; got shapes \("
    else:
        match = rf"^{name} must be 4-D .*tensor_layout='{layout}'"
    with pytest.raises(ValueError, match=match):
        sageattn(args["q"], args["k"], args["v"], tensor_layout=layout)


@pytest.mark.parametrize("shape", [(64,), (16, 64)])
def test_too_few_dimensions(shape):
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"^q must be \[batch, heads, tokens, head_dim\] for tensor_layout='HND'"):
        sageattn(q, q, q)
    with pytest.raises(ValueError, match=r"^q must be 4-D .*tensor_layout='NHD'"):
        sageattn(q, q, q, tensor_layout="NHD")


def test_leading_dimensions_differ():
    q = torch.zeros(2, 3, 4, 16, 64)
    with pytest.raises(ValueError, match=r"^q, k and v must have the same leading \(batch\) dimensions"):
        sageattn(q, q[:, :2], q)
    with pytest.raises(ValueError, match=r"^attn_mask's leading dimensions \(3, 1\) must broadcast to q's \(2, 3\)"):
        sageattn(q, q, q, attn_mask=torch.ones(3, 1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^attn_mask must broadcast to \[\.\.\., heads, N_q, N_kv\]"):
        sageattn(q, q, q, attn_mask=torch.ones(1, 2, 3, 4, 16, 16, dtype=torch.bool))


@pytest.mark.parametrize("value", ["0.1", None, True, torch.tensor(0.1)])
def test_dropout_p_type(value):
    with pytest.raises(TypeError, match=r"^dropout_p must be a float"):
        sageattn(*qkv(), dropout_p=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_dropout_p_range(value):
    with pytest.raises(ValueError, match=r"^dropout_p must be between 0 and 1"):
        sageattn(*qkv(), dropout_p=value)


def test_enable_gqa_type():
    with pytest.raises(TypeError, match=r"^enable_gqa must be a bool; got str"):
        sageattn(*qkv(), enable_gqa="yes")


def test_scale_and_sm_scale_together():
    with pytest.raises(TypeError, match=r"^give the softmax scale as scale or as sm_scale, not both"):
        sageattn(*qkv(), scale=0.1, sm_scale=0.1)
    with pytest.raises(ValueError, match=r"^scale must be a positive finite number"):
        sageattn(*qkv(), scale=-1.0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_unsupported_dtypes(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=r"^q must be float16, bfloat16 or float32"):
        sageattn(q, k, v)


@pytest.mark.parametrize("name", ["k", "v"])
def test_mixed_dtypes(name):
    args = dict(zip("qkv", qkv(), strict=True))
    args[name] = args[name].half()
    with pytest.raises(TypeError, match=r"q, k and v must have the same dtype"):
        sageattn(args["q"], args["k"], args["v"])


def test_mixed_devices():
    try:
        meta = torch.zeros(1, device="meta")
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - every torch ≥ 2.0 has "meta"
        pytest.skip(f"no second device on this machine: {exc}")
    assert meta.device != torch.device("cpu")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q, k and v must be on the same device; got cpu, meta, cpu"):
        sageattn(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"same device"):
        sageattn(q.to("meta"), k, v.to("meta"))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_mismatched_batch(layout):
    q, _, _ = qkv(b=2, layout=layout)
    _, k, v = qkv(b=3, layout=layout)
    with pytest.raises(ValueError, match=r"same batch size; got 2, 3, 3"):
        sageattn(q, k, v, tensor_layout=layout)


@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_head_dim(name):
    args = dict(zip("qkv", qkv(), strict=True))
    args[name] = args[name][..., :32]
    with pytest.raises(ValueError, match=rf"^{name} must have q's head_dim 64; got 32"):
        sageattn(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_mismatched_kv_heads(layout):
    q, k, _ = qkv(hq=4, hkv=4, layout=layout)
    _, _, v = qkv(hq=4, hkv=2, layout=layout)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads; got 4 and 2"):
        sageattn(q, k, v, tensor_layout=layout)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_mismatched_kv_tokens(layout):
    q, k, _ = qkv(nkv=16, layout=layout)
    _, _, v = qkv(nkv=12, layout=layout)
    with pytest.raises(ValueError, match=r"k and v must have the same number of tokens; got 16 and 12"):
        sageattn(q, k, v, tensor_layout=layout)


@pytest.mark.parametrize("hq, hkv", [(6, 4), (2, 4), (4, 0)])
def test_heads_not_a_multiple(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"q's heads \({hq}\) must be a multiple of k's and v's heads \({hkv}\)"):
        sageattn(q, k, v)


def test_nhd_heads_are_read_from_dim_2():
    # q [1, 16, 4, 64] and k [1, 6, 2, 64] read as NHD have 4 and 2 heads; read as HND, 16 and 6.
    q, k, v = qkv(hq=4, hkv=2, nq=16, nkv=6, layout="NHD")
    assert sageattn(q, k, v, tensor_layout="NHD").shape == q.shape
    with pytest.raises(ValueError, match="multiple"):
        sageattn(q, k, v, tensor_layout="HND")  # 16 "heads" against 6: the layout matters


def test_zero_head_dim():
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match=r"head_dim must be at least 1"):
        sageattn(q, k, v)


@pytest.mark.parametrize("layout", ["BHSD", "", "HDN", None, 3])
def test_unknown_layout(layout):
    with pytest.raises(ValueError, match=r"^tensor_layout must be 'HND' or 'NHD'"):
        sageattn(*qkv(), tensor_layout=layout)


@pytest.mark.parametrize("shape", [(16,), (16, 15), (15, 16), (2, 4, 16, 16), (1, 3, 16, 16), (1, 1, 1, 16, 16)])
def test_mask_wrong_shape(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^attn_mask must broadcast to \[batch, heads, seq_q, seq_kv\] = \[1, 4, 16"):
        sageattn(*qkv(nq=16, nkv=16), attn_mask=mask)


def test_mask_shape_uses_heads_and_tokens_in_either_layout():
    # NHD q [1, 10, 4, 64], k [1, 20, 2, 64]: the mask is [B, H_q, N_q, N_kv] = [1, 4, 10, 20] regardless.
    q, k, v = qkv(hq=4, hkv=2, nq=10, nkv=20, layout="NHD")
    out = sageattn(q, k, v, tensor_layout="NHD", attn_mask=torch.ones(1, 4, 10, 20, dtype=torch.bool))
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        sageattn(q, k, v, tensor_layout="NHD", attn_mask=torch.ones(1, 10, 4, 20, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_mask_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"^attn_mask must be bool or floating point"):
        sageattn(*qkv(), attn_mask=torch.ones(16, 16, dtype=dtype))


def test_mask_not_a_tensor():
    with pytest.raises(TypeError, match=r"^attn_mask must be a torch\.Tensor or None; got list"):
        sageattn(*qkv(), attn_mask=[[True]])


def test_mask_on_another_device():
    with pytest.raises(ValueError, match=r"^attn_mask must be on q's device cpu; got meta"):
        sageattn(*qkv(), attn_mask=torch.ones(16, 16, dtype=torch.bool, device="meta"))


def test_mask_with_is_causal():
    with pytest.raises(ValueError, match=r"attn_mask and is_causal=True cannot be combined"):
        sageattn(*qkv(), attn_mask=torch.ones(16, 16, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True), 1.0])
def test_is_causal_must_be_bool(value):
    with pytest.raises(TypeError, match=r"^is_causal must be a bool"):
        sageattn(*qkv(), is_causal=value)


def test_is_causal_checked_before_it_is_used_with_a_mask():
    # A truthy non-bool is_causal with a mask is an is_causal error, not a confusing mask error.
    with pytest.raises(TypeError, match=r"^is_causal must be a bool"):
        sageattn(*qkv(), is_causal=torch.ones(2), attn_mask=torch.ones(16, 16, dtype=torch.bool))


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.inf, math.nan, -math.inf])
def test_bad_sm_scale_value(value):
    with pytest.raises(ValueError, match=r"^sm_scale must be a positive finite number"):
        sageattn(*qkv(), sm_scale=value)


@pytest.mark.parametrize("value", ["0.1", True, torch.tensor(0.1), [0.1]])
def test_bad_sm_scale_type(value):
    with pytest.raises(TypeError, match=r"^sm_scale must be a float or None"):
        sageattn(*qkv(), sm_scale=value)


def test_sm_scale_accepts_ints_and_default():
    assert check_sm_scale(None, 64) == 0.125
    assert check_sm_scale(2, 64) == 2.0 and isinstance(check_sm_scale(2, 64), float)


@pytest.mark.parametrize("return_lse", [1, "no"])
def test_return_lse_must_be_bool(return_lse):
    with pytest.raises(TypeError, match=r"^return_lse must be a bool"):
        sageattn(*qkv(), return_lse=return_lse)


def test_keyword_only():
    with pytest.raises(TypeError):
        sageattn(*qkv(), "HND")


def test_causal_visible_is_bottom_right():
    rows, cols = torch.arange(2), torch.arange(4)
    visible = causal_visible(rows, cols, 2, 4)
    assert visible.tolist() == [[True, True, True, False], [True, True, True, True]]
    visible = causal_visible(torch.arange(4), torch.arange(2), 4, 2)
    assert visible.tolist() == [[False, False], [False, False], [True, False], [True, True]]


@pytest.mark.parametrize(
    "shape, rows",
    [
        ((2, 1, 1, 9), 2),
        ((1, 1, 1, 9), 1),
        ((1, 1, 9), 1),
        ((1, 9), 1),
        ((9,), 1),
        ((2, 4, 1, 9), None),  # per head
        ((2, 1, 5, 9), None),  # per query row
        ((1, 5, 9), None),
        ((5, 9), None),
        ((3, 1, 1, 9), None),  # neither the batch nor 1
        ((2, 1, 1, 1), None),  # one value for every key: not per key
        ((4, 1, 9), None),  # 3-D is [heads, N_q, N_kv]: per head
        ((), None),
        ((1, 2, 1, 1, 9), None),
    ],
)
def test_key_mask_rows(shape, rows):
    assert key_mask_rows(torch.zeros(shape), batch=2, seq_kv=9) == rows


def test_key_mask_rows_with_one_key():
    assert key_mask_rows(torch.zeros(2, 1, 1, 1), batch=2, seq_kv=1) == 2
