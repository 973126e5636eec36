"""COCO run-length encoding of the entities of an id map, without a dense mask per entity.

`id_map_to_rle(id_map, ids)` returns, for each requested id k, the COCO RLE of `id_map == k` exactly as
`pycocotools.mask.encode` writes it (counts as a str, byte-identical), its box as
`pycocotools.mask.toBbox` gives it (XYWH) and its area. It reads the id map once in column-major
(Fortran) order, a block of columns at a time, finds where the id changes, and derives everything from
those runs, vectorised with numpy: the runs of id k, in order, are exactly the 1-runs of its mask, and
two of them are never adjacent (they would be one run), so k's counts are
[gap before run 1, length 1, gap, length 2, ..., trailing gap if non-zero].

There is no separate reference: pycocotools itself is the reference (tests/ops/test_rle.py).
"""
from __future__ import annotations

import numpy as np
import torch

_MAX_CHARS = 13  # a 64-bit value needs at most ceil(64 / 5) characters of 5 bits


def _column_runs(id_map: np.ndarray, block_elems: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Start (column-major flat index) and value of every run of equal ids, reading blocks of columns.

    Only one block (about `block_elems` values) is ever copied into column-major order.
    """
    H, W = id_map.shape
    step = max(1, block_elems // H)
    starts, values = [], []
    prev = None
    for c0 in range(0, W, step):
        block = np.ascontiguousarray(id_map[:, c0 : c0 + step].T).ravel()  # columns c0.., column-major
        change = np.flatnonzero(block[1:] != block[:-1]) + 1
        if prev is None or block[0] != prev:
            change = np.concatenate([np.zeros(1, np.int64), change])
        starts.append(change.astype(np.int64) + c0 * H)
        values.append(block[change])
        prev = block[-1]
    return np.concatenate(starts), np.concatenate(values)


def _encode_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's string compression of (already delta-coded) counts: each value as little-endian 5-bit
    groups, 0x20 = more follows, sign-terminated, plus 48 (pycocotools' rleToString).

    Returns (chars: uint8 of all values in order, n_chars per value).
    """
    x = values.astype(np.int64)
    chars = np.zeros((len(x), _MAX_CHARS), np.uint8)
    n_chars = np.zeros(len(x), np.int64)
    active = np.arange(len(x))
    for r in range(_MAX_CHARS):
        if active.size == 0:
            break
        xv = x[active]
        c = xv & 0x1F
        xv = xv >> 5  # arithmetic shift, as on the C long
        more = np.where(c & 0x10, xv != -1, xv != 0)
        chars[active, r] = (c | (more.astype(np.int64) << 5)) + 48
        n_chars[active] += 1
        x[active] = xv
        active = active[more]
    return chars[np.arange(_MAX_CHARS)[None, :] < n_chars[:, None]], n_chars


def id_map_to_rle(id_map, ids):
    """COCO RLEs, boxes and areas of the entities `ids` of an id map, in one column-major pass.

    Args:
        id_map: H x W integer map (torch tensor on any device, or numpy array).
        ids: K ids to encode (e.g. k = query + 1 from `paste_entities`); an id absent from the map gives
            an empty mask. Repeated ids are allowed.
    Returns:
        rles: K dicts {"size": [H, W], "counts": str}, equal to pycocotools.mask.encode of
            `np.asfortranarray(id_map == k)` with counts decoded to str.
        boxes: K x 4 float64 XYWH, equal to pycocotools.mask.toBbox (zeros for empty masks).
        areas: K int64 pixel counts.
    """
    if isinstance(id_map, torch.Tensor):
        id_map = id_map.detach().cpu().numpy()
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or id_map.size == 0:
        raise ValueError(f"id_map must be a non-empty H x W map, got shape {id_map.shape}")
    if not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"id_map must hold integers, got {id_map.dtype}")
    H, W = id_map.shape
    N = H * W
    if N >= 1 << 32:
        raise ValueError(f"id_map has {N} pixels; COCO RLE counts are 32-bit")
    ids = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return [], torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    G = len(uniq)

    starts, values = _column_runs(id_map)
    ends = np.append(starts[1:], N)
    # Keep the runs of requested ids, grouped by id (stable: by start within an id).
    pos = np.searchsorted(uniq, values).clip(max=G - 1)
    keep = uniq[pos] == values
    group, st, en = pos[keep], starts[keep], ends[keep]
    order = np.argsort(group, kind="stable")
    group, st, en = group[order], st[order], en[order]
    n_runs = np.bincount(group, minlength=G)
    first = np.concatenate([[0], np.cumsum(n_runs)])  # runs of group g: first[g] .. first[g + 1]

    # Counts: per run (gap before it, its length), then the trailing gap when non-zero.
    prev_end = np.concatenate([[0], en[:-1]])
    is_first = np.zeros(len(st), bool)
    is_first[first[:-1][n_runs > 0]] = True
    gap = st - np.where(is_first, 0, prev_end)
    present = n_runs > 0
    last_end = np.zeros(G, np.int64)
    last_end[present] = en[first[1:][present] - 1]
    trailing = N - last_end  # N for an empty mask: its counts are [N]
    has_trail = trailing > 0
    n_counts = 2 * n_runs + has_trail
    cfirst = np.concatenate([[0], np.cumsum(n_counts)])
    counts = np.empty(cfirst[-1], np.int64)
    run_slot = 2 * np.arange(len(st)) + np.cumsum(np.concatenate([[0], has_trail]))[:-1][group]
    counts[run_slot] = gap
    counts[run_slot + 1] = en - st
    counts[cfirst[1:][has_trail] - 1] = trailing[has_trail]

    # Delta coding of pycocotools: from the 4th count of each mask on, subtract the count two before.
    local = np.arange(len(counts)) - np.repeat(cfirst[:-1], n_counts)
    delta = counts.copy()
    delta[local > 2] -= counts[np.flatnonzero(local > 2) - 2]
    chars, n_chars = _encode_counts(delta)
    char_first = np.concatenate([[0], np.cumsum(np.add.reduceat(n_chars, cfirst[:-1]))])  # every mask has >= 1 count
    text = chars.tobytes()
    rles = [
        {"size": [H, W], "counts": text[char_first[g] : char_first[g + 1]].decode("ascii")} for g in range(G)
    ]

    # Boxes as pycocotools' rleToBbox: columns of run starts and ends; rows of run starts and ends,
    # or all rows when a run wraps into the next column.
    x0, x1 = st // H, (en - 1) // H
    wraps = x1 > x0
    y0 = np.where(wraps, 0, st % H)
    y1 = np.where(wraps, H - 1, (en - 1) % H)
    boxes = np.zeros((G, 4), np.float64)
    areas = np.zeros(G, np.int64)
    if present.any():
        seg = first[:-1][present]
        xs, xe = np.minimum.reduceat(x0, seg), np.maximum.reduceat(x1, seg)
        ys, ye = np.minimum.reduceat(y0, seg), np.maximum.reduceat(y1, seg)
        boxes[present] = np.stack([xs, ys, xe - xs + 1, ye - ys + 1], 1)
        areas[present] = np.add.reduceat(en - st, seg)
    return [rles[i] for i in inverse], torch.from_numpy(boxes[inverse]), torch.from_numpy(areas[inverse])
