"""Which accumulator elements a lane holds, and which quantization group each Q row and K token is in.

Per-thread quantization chooses its groups so that every element of S = Q·Kᵀ that one lane holds in its
accumulator registers was produced by ONE Q scale and ONE K scale: dequantizing is then a single multiply
by a per-lane constant. These functions state the two sides of that contract, from the PTX ISA's fragment
layouts, so the tests can check that they agree:

- mma.sync m16n8kK (INT8 k32, INT4 k64, FP8 k32, FP16 k16: the C/D layout is the same): lane l holds
  rows l/4 and l/4 + 8, columns 2·(l%4) and 2·(l%4) + 1.
- wgmma m64nNk32: warp w of the warpgroup holds rows 16·w + l/4 and 16·w + l/4 + 8; for each 8-column
  chunk c of N, columns 8·c + 2·(l%4) and 8·c + 2·(l%4) + 1.

Q groups: within a warp's slice of `warp_q` rows, rows with the same index mod 8 share a scale.
K groups: within a K block, tokens whose index mod 8 is in {2j, 2j+1} share a scale (4 per block).
"""

from __future__ import annotations

from ..tiling import COL_GROUPS, ROW_GROUPS

WARP_SIZE = 32


def mma_m16n8_accumulator(lane: int) -> list[tuple[int, int]]:
    """(row, col) of the 4 accumulator elements c0..c3 lane `lane` holds in an m16n8 mma.sync tile."""
    group, pair = divmod(lane, 4)
    return [(group, 2 * pair), (group, 2 * pair + 1), (group + 8, 2 * pair), (group + 8, 2 * pair + 1)]


def wgmma_m64_accumulator(warp: int, lane: int, n: int) -> list[tuple[int, int]]:
    """(row, col) of the accumulator elements lane `lane` of warp `warp` (0..3) holds in an m64nN wgmma tile."""
    group, pair = divmod(lane, 4)
    coords = []
    for chunk in range(n // 8):
        for row in (16 * warp + group, 16 * warp + group + 8):
            coords += [(row, 8 * chunk + 2 * pair), (row, 8 * chunk + 2 * pair + 1)]
    return coords


def q_group(row: int, warp_q: int) -> tuple[int, int]:
    """(warp slice, group) of Q row `row`: the rows sharing one per-thread Q scale."""
    return row // warp_q, row % ROW_GROUPS


def k_group(token: int, block_k: int) -> tuple[int, int]:
    """(K block, group) of K token `token`: the tokens sharing one per-thread K scale."""
    return token // block_k, (token % ROW_GROUPS) // (ROW_GROUPS // COL_GROUPS)
