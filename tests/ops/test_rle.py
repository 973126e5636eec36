"""`id_map_to_rle` against pycocotools (the reference): counts byte-identical to mask.encode, boxes equal
to mask.toBbox, areas equal to mask.area, for every requested id (present, absent, repeated)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from cropformer.ops.rle import _column_runs, id_map_to_rle


def coco(id_map: np.ndarray, k: int) -> dict:
    return mask_utils.encode(np.asfortranarray((id_map == k).astype(np.uint8)))


def assert_matches_pycocotools(id_map: np.ndarray, ids, as_tensor=True):
    rles, boxes, areas = id_map_to_rle(torch.from_numpy(id_map) if as_tensor else id_map, ids)
    assert len(rles) == len(ids) and boxes.shape == (len(ids), 4) and areas.shape == (len(ids),)
    for i, k in enumerate(ids):
        expected = coco(id_map, k)
        assert rles[i]["size"] == list(expected["size"])
        assert isinstance(rles[i]["counts"], str)
        assert rles[i]["counts"].encode("ascii") == expected["counts"], (
            f"id {k}: {rles[i]['counts'][:60]!r} != {expected['counts'][:60]!r}"
        )
        assert np.array_equal(boxes[i].numpy(), mask_utils.toBbox(expected)), (k, boxes[i], mask_utils.toBbox(expected))
        assert int(areas[i]) == int(mask_utils.area(expected))


def blocks(H, W, K, rng):
    """Overlapping rectangles painted in order: long runs, masks touching borders and wrapping columns."""
    m = np.zeros((H, W), np.int32)
    for k in range(1, K + 1):
        y0, x0 = rng.integers(0, H), rng.integers(0, W)
        m[y0 : y0 + rng.integers(1, H + 1), x0 : x0 + rng.integers(1, W + 1)] = k
    return m


# Sizes: single pixel, single row / column, odd and prime sizes; ids include 0 (background), absent
# ids and a large id.
@pytest.mark.parametrize("H,W", [(1, 1), (1, 7), (7, 1), (37, 53), (64, 97), (211, 300)])
@pytest.mark.parametrize("kind", ["random", "blocks"])
def test_matches_pycocotools(H, W, kind):
    rng = np.random.default_rng(H * 1000 + W)
    K = 12
    id_map = rng.integers(0, K + 1, (H, W)).astype(np.int32) if kind == "random" else blocks(H, W, K, rng)
    assert_matches_pycocotools(id_map, list(range(0, K + 3)) + [70000])


def test_full_and_edge_masks():
    id_map = np.full((5, 4), 3, np.int32)
    assert_matches_pycocotools(id_map, [3, 1])  # one mask covering everything; one empty
    id_map[:, 0] = 2  # first column; then a mask ending at the last pixel
    id_map[-1, -1] = 5
    assert_matches_pycocotools(id_map, [2, 3, 5])


def test_large_counts_use_long_encodings():
    # Runs of 10^5..10^6 pixels need 4-5 characters; deltas between counts are negative, too.
    id_map = np.zeros((1000, 1200), np.int64)
    id_map[:, 100:900] = 1
    id_map[200:210, 50:1150] = 2
    id_map[999, 1199] = 7
    assert_matches_pycocotools(id_map, [0, 1, 2, 7], as_tensor=False)


def test_repeated_and_unsorted_ids():
    rng = np.random.default_rng(1)
    id_map = blocks(41, 43, 6, rng)
    assert_matches_pycocotools(id_map, [5, 1, 5, 9, 0, 1])
    assert id_map_to_rle(id_map, [])[0] == []


def test_column_blocks_stitch_runs():
    """Runs crossing the boundary of the column blocks are one run."""
    rng = np.random.default_rng(2)
    id_map = blocks(13, 29, 4, rng)
    s_small, v_small = _column_runs(id_map, block_elems=13 * 3)  # 3 columns per block
    s_all, v_all = _column_runs(id_map, block_elems=1 << 20)
    assert np.array_equal(s_small, s_all) and np.array_equal(v_small, v_all)
    flat = id_map.T.ravel()
    assert np.array_equal(v_all, flat[s_all]) and (np.diff(v_all) != 0).all()


@pytest.mark.parametrize("bad", [np.zeros((0, 4), np.int32), np.zeros(5, np.int32), np.zeros((3, 3), np.float32)])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        id_map_to_rle(bad, [1])
