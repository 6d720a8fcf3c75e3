"""The per-thread quantization groups match the tensor-core accumulator layouts, one test per mapping.

For every lane of every warp, the S = Q·Kᵀ accumulator elements it holds must all come from one Q scale and
one K scale (`layout.q_group`, `layout.k_group`), the lanes together must cover the tile exactly once, and the
quantizer (`quant.quantize_int` with `quant.q_group_ids` / `quant.k_group_ids`) must give exactly those groups
one scale each: equal within a group, amax over the group / qmax, and different between groups.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from comfy_sage.reference import layout, quant
from comfy_sage.tiling import SM80, SM90, Tiling

WARPS_PER_WARPGROUP = 4


def mma_warp_tile(warp_q: int, block_k: int) -> dict[int, list[tuple[int, int]]]:
    """Lane → (row, col) of the warp_q × block_k S tile one warp computes with m16n8 mma.sync instructions.

    INT8 (m16n8k32) and INT4 (m16n8k64) share this C fragment: (warp_q / 16) × (block_k / 8) m16n8 tiles.
    """
    lanes: dict[int, list[tuple[int, int]]] = {}
    for lane in range(layout.WARP_SIZE):
        coords = []
        for m_tile, n_tile in itertools.product(range(warp_q // 16), range(block_k // 8)):
            coords += [(16 * m_tile + r, 8 * n_tile + c) for r, c in layout.mma_m16n8_accumulator(lane)]
        lanes[lane] = coords
    return lanes


def wgmma_tile(n: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(warp, lane) → (row, col) of an m64nN wgmma accumulator of one warpgroup."""
    return {
        (warp, lane): layout.wgmma_m64_accumulator(warp, lane, n)
        for warp in range(WARPS_PER_WARPGROUP)
        for lane in range(layout.WARP_SIZE)
    }


def assert_covers_once(holders: dict, rows: int, cols: int) -> None:
    seen = [c for coords in holders.values() for c in coords]
    assert len(seen) == rows * cols, f"{len(seen)} elements held, tile has {rows * cols}"
    assert set(seen) == {(r, c) for r in range(rows) for c in range(cols)}, "the lanes do not cover the tile"


def assert_one_group_per_lane(holders: dict, row0: int, col0: int, tiling: Tiling) -> None:
    """Placed at (row0, col0) of S, each holder's elements share one Q group and one K group."""
    for holder, coords in holders.items():
        q_groups = {layout.q_group(row0 + r, tiling.warp_q) for r, _ in coords}
        k_groups = {layout.k_group(col0 + c, tiling.block_k) for _, c in coords}
        assert len(q_groups) == 1, f"{holder} at ({row0}, {col0}) holds Q groups {q_groups}"
        assert len(k_groups) == 1, f"{holder} at ({row0}, {col0}) holds K groups {k_groups}"


def assert_quantizer_uses_groups(tiling: Tiling, seq_q: int, seq_kv: int, bits: int, seed: int) -> None:
    """quantize_int's scales, element by element, against the pure-Python layout functions."""
    g = torch.Generator().manual_seed(seed)
    qmax = quant.INT_MAX[bits]
    for seq, ids_fn, group_fn, size in (
        (seq_q, quant.q_group_ids, layout.q_group, tiling.warp_q),
        (seq_kv, quant.k_group_ids, layout.k_group, tiling.block_k),
    ):
        # Token norms vary (log-normal), so every group has its own amax.
        x = torch.randn(2, 4, seq, 64, generator=g) * torch.exp(torch.randn(2, 4, seq, 1, generator=g))
        ids = ids_fn(seq, tiling, quant.Granularity.THREAD, x.device)
        _, scale = quant.quantize_int(x, bits, ids)
        members: dict[tuple[int, int], list[int]] = {}
        for i in range(seq):
            members.setdefault(group_fn(i, size), []).append(i)
        # The vectorized ids partition the tokens exactly as the layout functions do (a bijection of labels).
        pairs = {(int(ids[i]), group_fn(i, size)) for i in range(seq)}
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(members), pairs
        for rows in members.values():
            expected = x[:, :, rows].abs().amax((-1, -2)) / qmax  # [B, H]
            got = scale[:, :, rows]
            assert torch.equal(got, expected[..., None].expand_as(got)), f"group {rows}: scale != amax / {qmax}"
        # Different groups, different scales (random data: all amax values are distinct).
        per_group = torch.stack([scale[:, :, rows[0]] for rows in members.values()], -1)
        distinct = [len(set(per_group[b, h].tolist())) for b in range(2) for h in range(4)]
        assert distinct == [len(members)] * 8, f"{distinct} distinct scales for {len(members)} groups, seed {seed}"


@pytest.mark.parametrize("bits", [8, 4], ids=["int8_m16n8k32", "int4_m16n8k64"])
@pytest.mark.parametrize("warp_q", [16, 32])
def test_mma_m16n8_fragment(warp_q: int, bits: int) -> None:
    tiling = Tiling(block_q=128, warp_q=warp_q, block_k=SM80.block_k, pv_k=SM80.pv_k)
    lanes = mma_warp_tile(warp_q, tiling.block_k)
    assert all(len(c) == 4 * (warp_q // 16) * (tiling.block_k // 8) for c in lanes.values())
    assert_covers_once(lanes, warp_q, tiling.block_k)
    # Every warp of the Q block, every K block (the first three, and one far away).
    for warp in range(tiling.block_q // warp_q):
        for k_block in (0, 1, 2, 37):
            assert_one_group_per_lane(lanes, 512 + warp * warp_q, k_block * tiling.block_k, tiling)
    # Eight Q groups per warp; four K groups per K block.
    assert len({layout.q_group(r, warp_q) for r in range(warp_q)}) == 8
    assert len({layout.k_group(c, tiling.block_k) for c in range(tiling.block_k)}) == 4
    assert_quantizer_uses_groups(tiling, seq_q=2 * tiling.block_q + 40, seq_kv=3 * tiling.block_k + 24, bits=bits,
                                 seed=warp_q + bits)  # fmt: skip


@pytest.mark.parametrize("n", [64, 128, 256])
def test_wgmma_m64n_fragment(n: int) -> None:
    # The wgmma N is the K block; each warp of the warpgroup owns 16 Q rows.
    tiling = Tiling(block_q=SM90.block_q, warp_q=SM90.warp_q, block_k=n, pv_k=SM90.pv_k)
    holders = wgmma_tile(n)
    assert all(len(c) == n // 2 for c in holders.values())
    assert_covers_once(holders, 64, n)
    for warpgroup in range(tiling.block_q // 64):
        for k_block in (0, 1, 5):
            assert_one_group_per_lane(holders, 1024 + 64 * warpgroup, k_block * n, tiling)
    assert_quantizer_uses_groups(tiling, seq_q=tiling.block_q + 72, seq_kv=2 * n + 40, bits=8, seed=n)


def test_sm90_tiling_is_the_wgmma_mapping() -> None:
    """The SM90 tiling's groups are those of m64nN with N = its K block (one warp = 16 rows)."""
    holders = wgmma_tile(SM90.block_k)
    assert_one_group_per_lane(holders, 0, 0, SM90)
    assert_one_group_per_lane(holders, 64, SM90.block_k, SM90)


def test_block_and_tensor_granularity() -> None:
    """The coarser groups the accuracy comparisons use: one per Q/K block, or one per (batch, head)."""
    for seq in (1, 77, 300):
        q_block = quant.q_group_ids(seq, SM80, quant.Granularity.BLOCK, torch.device("cpu"))
        k_block = quant.k_group_ids(seq, SM80, quant.Granularity.BLOCK, torch.device("cpu"))
        assert q_block.tolist() == [i // SM80.block_q for i in range(seq)]
        assert k_block.tolist() == [i // SM80.block_k for i in range(seq)]
        for ids_fn in (quant.q_group_ids, quant.k_group_ids):
            assert ids_fn(seq, SM80, quant.Granularity.TENSOR, torch.device("cpu")).tolist() == [0] * seq
