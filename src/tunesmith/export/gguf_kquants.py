"""numpy encoders for llama.cpp's Q6_K, Q5_K and Q4_K blocks, which `gguf.quants` can read but not write.

A super-block holds 256 values (QK_K). The byte layouts are the inverse of `gguf.quants.Q6_K` /
`Q4_K.dequantize_blocks`, and the tests check each encoder by a round trip through them. Sub-block
scales (and Q4_K's offsets) come from least-squares searches like llama.cpp's `make_qx_quants` and
`make_qkx2_quants`, without its importance weighting: llama-quantize with an importance matrix is
the tool for the best K-quant files.

- Q6_K: 16 sub-blocks of 16 values, q in [-32, 31], an int8 scale per sub-block, one f16 `d`.
- Q4_K: 8 sub-blocks of 32 values, q in [0, 15], 6-bit scale and 6-bit min per sub-block (packed into
  12 bytes), f16 `d` and `dmin`: value = d * scale * q - dmin * min.
- Q5_K: Q4_K's layout with q in [0, 31]; the fifth bit of each value is kept in 32 more bytes.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _blocks(rows: np.ndarray) -> np.ndarray:
    data = np.asarray(rows, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"row size {data.shape[-1]} is not a multiple of {QK_K}")
    return data.reshape(-1, QK_K)


def _shape(rows: np.ndarray, type_size: int) -> tuple[int, ...]:
    return (*rows.shape[:-1], rows.shape[-1] // QK_K * type_size)


def _searched_scale(sub: np.ndarray, nmax: int) -> np.ndarray:
    """Per sub-block scale for q in [-nmax, nmax - 1], as llama.cpp's make_qx_quants chooses it: try
    19 reciprocal scales around -nmax / peak, fit each by least squares, keep the smallest error."""
    at = np.abs(sub).argmax(-1)[..., None]
    peak = np.take_along_axis(sub, at, -1)  # signed value of largest magnitude
    safe = np.where(peak != 0, peak, 1)
    best_scale = np.zeros(sub.shape[:-1], dtype=np.float32)
    best_error = np.full(sub.shape[:-1], np.inf, dtype=np.float32)
    for step in range(-9, 10):
        iscale = -(nmax + 0.1 * step) / safe
        q = np.clip(np.rint(iscale * sub), -nmax, nmax - 1)
        suml2 = (q * q).sum(-1)
        scale = np.where(suml2 > 0, (sub * q).sum(-1) / np.where(suml2 > 0, suml2, 1), 0)
        error = ((sub - scale[..., None] * q) ** 2).sum(-1)
        better = error < best_error
        best_scale, best_error = np.where(better, scale, best_scale), np.where(better, error, best_error)
    return np.where(peak[..., 0] != 0, best_scale, 0).astype(np.float32)


def _searched_scale_min(
    sub: np.ndarray, nmax: int, rmin: float = -1.0, steps: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (scale, offset <= 0) for q in [0, nmax], as llama.cpp's make_qkx2_quants chooses
    them: start from min/max, try `steps` + 1 reciprocal scales (nmax + rmin + 0.1 * step) / range,
    fit scale and offset of each by least squares, keep the smallest error. llama.cpp searches with
    rmin -1, 20 steps for Q4_K and rmin -0.5, 15 steps for Q5_K."""
    low = np.minimum(sub.min(-1), 0)
    span = sub.max(-1) - low
    safe = np.where(span > 0, span, 1)
    count = sub.shape[-1]

    def error(scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        q = np.clip(np.rint((sub - offset[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, nmax)
        return ((sub - scale[..., None] * q - offset[..., None]) ** 2).sum(-1)

    best_scale, best_offset = span / nmax, low
    best_error = error(best_scale, best_offset)
    for step in range(steps + 1):
        q = np.clip(np.rint(((nmax + rmin + 0.1 * step) / safe)[..., None] * (sub - low[..., None])), 0, nmax)
        sum_q, sum_q2 = q.sum(-1), (q * q).sum(-1)
        sum_x, sum_qx = sub.sum(-1), (q * sub).sum(-1)
        det = count * sum_q2 - sum_q * sum_q
        det_safe = np.where(det > 0, det, 1)
        scale = (count * sum_qx - sum_q * sum_x) / det_safe
        offset = (sum_q2 * sum_x - sum_q * sum_qx) / det_safe
        positive = offset > 0  # the offset must stay a subtraction: refit the scale alone
        scale = np.where(positive, sum_qx / np.where(sum_q2 > 0, sum_q2, 1), scale)
        offset = np.where(positive, 0, offset)
        candidate = error(scale, offset)
        better = (det > 0) & (scale > 0) & (candidate < best_error)
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, offset, best_offset)
        best_error = np.where(better, candidate, best_error)
    return best_scale.astype(np.float32), np.minimum(best_offset, 0).astype(np.float32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = _searched_scale(sub, 32)
    widest = np.take_along_axis(scale, np.abs(scale).argmax(-1)[..., None], -1)  # signed
    safe = np.where(widest != 0, widest, 1)
    iscale = np.where(widest != 0, -128 / safe, 0)
    scales = np.clip(np.rint(iscale * scale), -128, 127).astype(np.int8)
    d = np.where(widest != 0, -safe / 128, 0).astype(np.float16)
    step = d.astype(np.float32) * scales.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] != 0, np.rint(sub / step[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    high = high.reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, scales.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=-1)
    return out.reshape(_shape(rows, 210))


def _scale_min_blocks(x: np.ndarray, nmax: int, rmin: float, steps: int):
    """Q4_K / Q5_K's common part: (d, dmin, 12 packed scale bytes, q as (blocks, 8, 32) in [0, nmax])."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    scale, low = _searched_scale_min(sub, nmax, rmin, steps)  # low <= 0: stored as a non-negative min
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = ((-low).max(-1, keepdims=True) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / np.where(d32 > 0, d32, 1)), 0)
        mn = np.where(dmin32 > 0, np.rint(-low / np.where(dmin32 > 0, dmin32, 1)), 0)
    sc = np.clip(sc, 0, 63).astype(np.uint8)
    mn = np.clip(mn, 0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]
    offset = (dmin32 * mn)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, np.rint((sub + offset) / np.where(step != 0, step, 1)), 0)
    packed = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)
    return d, dmin, packed, np.clip(q, 0, nmax).astype(np.uint8)


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2k and 2k + 1 share 32 bytes: 2k in the low nibbles, 2k + 1 in the high ones."""
    n = q.shape[0]
    pairs = (q & 0x0F).reshape(n, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    d, dmin, packed, q = _scale_min_blocks(x, 15, -1.0, 20)
    out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, _low_nibbles(q)], axis=-1)
    return out.reshape(_shape(rows, 144))


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows)
    d, dmin, packed, q = _scale_min_blocks(x, 31, -0.5, 15)
    high = (q >> 4).astype(np.uint8)  # (blocks, 8, 32): bit i of byte j is sub-block i's value j
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        qh |= high[:, i] << i
    out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qh, _low_nibbles(q)], axis=-1)
    return out.reshape(_shape(rows, 176))


ENCODERS = {"q6_k": quantize_q6_k, "q5_k": quantize_q5_k, "q4_k": quantize_q4_k}
# llama-quantize's types for rows that are not 256-aligned
FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0"}
MIX_BASE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quantize's Q4_K_M / Q5_K_M rule for which attn_v / ffn_down layers get Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def k_type(gguf_name: str, file_type: str, n_layers: int, is_output: bool) -> str:
    """The block type of a quantizable weight in a q4_k_m / q5_k_m / q6_k file (llama_tensor_get_type):
    q6_k for the output and for attn_v / ffn_down where `use_more_bits` says, the mix's base elsewhere."""
    if file_type == "q6_k" or is_output:
        return "q6_k"
    base = MIX_BASE[file_type]
    if gguf_name.endswith(("attn_v.weight", "ffn_down.weight")):
        layer = int(gguf_name.split(".")[1])
        return "q6_k" if use_more_bits(layer, n_layers) else base
    return base
