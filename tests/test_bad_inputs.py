"""The bad-input matrix (issue 13): every class of bad input through every entry point of images,
inference and evaluation (`cropformer infer`, `cropformer eval`, the Python API).

Each case asserts the exit status, that the message names the file and the problem, that no input
changed (hashes before and after), that nothing partial is left under an output name, and that the
good images of the same batch still got their outputs. A tiny model with random weights and small
images keep it fast; sliver and 15,000 px cases run the real view planning.
"""
from __future__ import annotations

import copy
import hashlib
import json
import signal
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from cropformer.cli import run
from cropformer.cli import eval as eval_cli
from cropformer.cli import infer as infer_cli
from cropformer.config import load_config
from cropformer.evaluation import EvaluationInputError, evaluate_entities
from cropformer.inference import Segmenter
from cropformer.modeling.build import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The tiny architecture with random weights, at a small test size (fast on CPU)."""
    from cropformer.checkpoint import export_weights

    torch.manual_seed(0)
    cfg = load_config("tiny", ["input.min_size_test=64", "input.max_size_test=256"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_weights(build_model(cfg.model), cfg, path)
    return path


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("CROPFORMER_DEBUG", raising=False)


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([(xx * 0.9 + seed * 40) % 255, (yy * 1.3) % 255, ((xx + yy) * 0.4) % 255], -1)
    return img.astype(np.uint8)


def encode(img: np.ndarray, ext: str, **kw) -> bytes:
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if kw.get("progressive") else []
    ok, buf = cv2.imencode(ext, img[..., ::-1] if img.ndim == 3 else img, params)
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A PNG header claiming 30000 x 30000 px (900 Mpx, over MAX_PIXELS) with no real data."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")


def float_tiff(path: Path) -> None:
    Image.fromarray(np.ones((20, 30), np.float32)).save(path)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Temporary files left in the output tree (an interrupted or failed write)."""
    return [str(p) for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def cli(main, argv, capsys) -> tuple[int, str]:
    code = run(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def outputs_of(out: Path, rel: str) -> list[Path]:
    return infer_cli.output_paths(out, Path(rel))


def assert_complete(out: Path, rel: str, hw: tuple[int, int]) -> None:
    ids, vis, meta = outputs_of(out, rel)
    id_map = cv2.imread(str(ids), cv2.IMREAD_UNCHANGED)
    assert id_map is not None and id_map.shape == hw, (rel, None if id_map is None else id_map.shape)
    assert json.loads(meta.read_text())["height"] == hw[0] and cv2.imread(str(vis)) is not None


# ---------------------------------------------------------------------------------------------------
# infer: one bad image among good ones; the batch goes on, the failure is reported, exit status 1.

GOOD = smooth(48, 64)


def _truncated(ext: str, **kw):
    return lambda path: path.write_bytes(encode(smooth(120, 160, 1), ext, **kw)[: -len(encode(smooth(120, 160, 1), ext, **kw)) // 3])


BAD_IMAGES = {
    # name: (file name, writer, reason the report must give)
    "truncated_jpeg": ("cut.jpg", _truncated(".jpg"), "truncated|decoding failed"),
    "truncated_progressive_jpeg": ("cutp.jpg", _truncated(".jpg", progressive=True), "truncated|decoding failed"),
    "truncated_png": ("cut.png", _truncated(".png"), "truncated|decoding failed"),
    "empty_file": ("empty.jpg", lambda p: p.write_bytes(b""), "not a readable image"),
    "random_bytes": ("noise.png", lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "not a readable image"),
    "text_as_jpeg": ("notes.jpg", lambda p: p.write_text("not an image\n"), "not a readable image"),
    "jpeg_header_only": ("head.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"), "not a readable image"),
    "decompression_bomb": ("bomb.png", lambda p: p.write_bytes(bomb_png()), "too large|exceeds MAX_PIXELS"),
    "float_tiff": ("float.tif", float_tiff, "unsupported image mode"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_infer_bad_image_is_reported_and_batch_goes_on(case, ckpt, tmp_path, capsys):
    name, write, reason = BAD_IMAGES[case]
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    (inp / "a.jpg").write_bytes(encode(GOOD, ".jpg"))
    (inp / "sub" / "b.png").write_bytes(encode(GOOD, ".png"))
    write(inp / name)
    before = tree_hashes(inp)
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out], capsys)
    assert code == 1
    assert "2 segmented" in text and "1 failed" in text and str(inp / name) in text
    report = json.loads((out / "failures.json").read_text())
    assert report["total"] == 3 and report["segmented"] == 2
    (failure,) = report["failed"]
    assert failure["path"] == str(inp / name) and failure["stage"] == "decode"
    assert __import__("re").search(reason, failure["reason"]), failure["reason"]
    assert tree_hashes(inp) == before
    assert not any(p.exists() for p in outputs_of(out, name)) and not leftovers(out)
    assert_complete(out, "a.jpg", (48, 64))
    assert_complete(out, "sub/b.png", (48, 64))


def _fail_segment(exc):
    """The network fails on any call that holds the 37 px wide image (`segment` goes through
    `segment_batch`, so batched and one-at-a-time inference both hit it)."""
    def patch(monkeypatch):
        segment_batch = Segmenter.segment_batch

        def failing(self, images, *args, **kwargs):
            if any(image.width == 37 for image in images):
                raise exc
            return segment_batch(self, images, *args, **kwargs)

        monkeypatch.setattr(Segmenter, "segment_batch", failing)
    return patch


def _fail_overlay(monkeypatch):
    import cropformer.visualize

    overlay = cropformer.visualize.overlay
    monkeypatch.setattr(cropformer.visualize, "overlay",
                        lambda img, ids, **kw: (_ for _ in ()).throw(OSError(28, "No space left on device", "x"))
                        if img.shape[1] == 37 else overlay(img, ids, **kw))


STAGE_FAILURES = {
    # name: (patch, stage, reason)
    "model_error": (_fail_segment(RuntimeError("shape mismatch in the decoder")), "segment", "RuntimeError: shape mismatch"),
    "out_of_memory": (_fail_segment(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")), "segment",
                      "OutOfMemoryError: CUDA out of memory"),
    "value_error": (_fail_segment(ValueError("bad view size")), "segment", "ValueError: bad view size"),
    "disk_full_mid_write": (_fail_overlay, "write", "no space left on device"),
}


@pytest.mark.parametrize("batch", ["1", "3"])
@pytest.mark.parametrize("case", list(STAGE_FAILURES))
def test_infer_failure_at_a_later_stage(case, batch, ckpt, tmp_path, capsys, monkeypatch):
    """One image failing after decoding spares the others, one at a time or in a batch (the batch is
    then rerun image by image, so only the image at fault is reported)."""
    patch, stage, reason = STAGE_FAILURES[case]
    patch(monkeypatch)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(encode(GOOD, ".png"))
    (inp / "odd.png").write_bytes(encode(smooth(40, 37), ".png"))  # the patched failure hits width 37
    (inp / "z.jpg").write_bytes(encode(GOOD, ".jpg"))
    before = tree_hashes(inp)
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out, "--batch-size", batch], capsys)
    assert code == 1 and "2 segmented" in text and str(inp / "odd.png") in text
    (failure,) = json.loads((out / "failures.json").read_text())["failed"]
    assert (failure["path"], failure["stage"]) == (str(inp / "odd.png"), stage)
    assert reason in failure["reason"], failure["reason"]
    assert tree_hashes(inp) == before
    assert not any(p.exists() for p in outputs_of(out, "odd.png")) and not leftovers(out)
    assert_complete(out, "a.png", (48, 64))
    assert_complete(out, "z.jpg", (48, 64))


def test_infer_write_error_in_a_blocked_folder(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    (inp / "a.png").write_bytes(encode(GOOD, ".png"))
    (inp / "sub" / "b.png").write_bytes(encode(GOOD, ".png"))
    out.mkdir()
    (out / "sub").write_text("a file where the output folder should be")
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out], capsys)
    assert code == 1
    (failure,) = json.loads((out / "failures.json").read_text())["failed"]
    assert (failure["path"], failure["stage"]) == (str(inp / "sub" / "b.png"), "write")
    assert (out / "sub").read_text() == "a file where the output folder should be"
    assert_complete(out, "a.png", (48, 64))


def test_infer_missing_file_in_a_list(ckpt, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encode(GOOD, ".png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n{tmp_path / 'gone.jpg'}\n")
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", listing, "--out", tmp_path / "out"], capsys)
    assert code == 1 and str(tmp_path / "gone.jpg") in text
    (failure,) = json.loads((tmp_path / "out" / "failures.json").read_text())["failed"]
    assert failure["stage"] == "decode" and "No such file" in failure["reason"]
    assert_complete(tmp_path / "out", "a.png", (48, 64))


# ---------------------------------------------------------------------------------------------------
# infer: every image that decodes is segmented, whatever its size, aspect or pixel format.

def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the file is 30 x 50, the image 50 x 30
    Image.fromarray(smooth(30, 50)).save(path, exif=exif.tobytes())


ODD_IMAGES = {
    # name: (file name, writer, (H, W) of the id map)
    "1x1": ("one.png", lambda p: p.write_bytes(encode(smooth(1, 1), ".png")), (1, 1)),
    "2x2": ("two.png", lambda p: p.write_bytes(encode(smooth(2, 2), ".png")), (2, 2)),
    "1x7": ("row.png", lambda p: p.write_bytes(encode(smooth(1, 7), ".png")), (1, 7)),
    "7x1": ("col.png", lambda p: p.write_bytes(encode(smooth(7, 1), ".png")), (7, 1)),
    "sliver_3x50000": ("sliver.png", lambda p: p.write_bytes(encode(smooth(3, 50000), ".png")), (3, 50000)),
    "sliver_50000x3": ("tower.png", lambda p: p.write_bytes(encode(smooth(50000, 3), ".png")), (50000, 3)),
    "panorama_15000x24": ("pano.jpg", lambda p: p.write_bytes(encode(smooth(24, 15000), ".jpg")), (24, 15000)),
    "grey_16bit": ("g16.png", lambda p: p.write_bytes(encode((smooth(33, 45)[..., 0].astype(np.uint16) * 257), ".png")), (33, 45)),
    "rgba": ("rgba.png", lambda p: Image.fromarray(np.dstack([smooth(33, 45), np.full((33, 45), 9, np.uint8)])).save(p), (33, 45)),
    "palette": ("pal.png", lambda p: Image.fromarray(smooth(33, 45)).convert("P").save(p), (33, 45)),
    "exif_rotated_jpeg": ("rot.jpg", _exif_rotated, (50, 30)),
}


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_infer_segments_any_size_and_format(case, ckpt, tmp_path, capsys):
    name, write, hw = ODD_IMAGES[case]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write(inp / name)
    before = tree_hashes(inp)
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out, "--mode", "full_crops"], capsys)
    assert code == 0, text
    assert_complete(out, name, hw)
    assert tree_hashes(inp) == before and not leftovers(out)


# ---------------------------------------------------------------------------------------------------
# infer: inputs are never written over; names are unique per input; resume is keyed on the input.

@pytest.mark.parametrize("where", ["same_folder", "parent_of_inputs", "glob_into_out"])
def test_infer_refuses_an_out_folder_holding_inputs(where, ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.png").write_bytes(encode(GOOD, ".png"))
    (photos / "sub" / "b.jpg").write_bytes(encode(GOOD, ".jpg"))
    args = {"same_folder": (photos, photos), "parent_of_inputs": (photos / "sub", tmp_path),
            "glob_into_out": (f"{photos}/**/*.*", photos / "sub")}[where]
    before = tree_hashes(tmp_path)
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", args[0], "--out", args[1]], capsys)
    assert code == 2 and "error: --out" in text and "contains the input" in text and "Traceback" not in text
    assert tree_hashes(tmp_path) == before  # nothing written at all


def test_infer_unique_names_out_inside_input_folder_and_resume(ckpt, tmp_path, capsys):
    """a.jpg, a.png and sub/a.jpg get their own outputs; --out inside the input folder is allowed and
    never read as input; resume skips unchanged inputs and redoes a changed one."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(encode(GOOD, ".jpg"))
    (photos / "a.png").write_bytes(encode(smooth(40, 56, 2), ".png"))
    (photos / "sub" / "a.jpg").write_bytes(encode(smooth(30, 44, 3), ".jpg"))
    out = photos / "seg"
    before = tree_hashes(photos)
    args = ["--ckpt", ckpt, "--input", photos, "--out", out]
    code, text = cli(infer_cli.main, args, capsys)
    assert code == 0 and "3 segmented" in text
    assert_complete(out, "a.jpg", (48, 64))
    assert_complete(out, "a.png", (40, 56))
    assert_complete(out, "sub/a.jpg", (30, 44))
    assert {k: v for k, v in tree_hashes(photos).items() if not k.startswith("seg/")} == before
    code, text = cli(infer_cli.main, args, capsys)
    assert code == 0 and "0 segmented, 3 already done" in text  # seg/ (with its .jpg overlays) is no input
    (photos / "a.png").write_bytes(encode(smooth(41, 57, 4), ".png"))  # the input changed: redone
    code, text = cli(infer_cli.main, args, capsys)
    assert code == 0 and "1 segmented, 2 already done" in text
    assert_complete(out, "a.png", (41, 57))


def test_infer_torn_output_is_redone(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(encode(GOOD, ".png"))
    assert cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out], capsys)[0] == 0
    meta = outputs_of(out, "a.png")[2]
    meta.write_text(meta.read_text()[:20])  # a JSON cut short (not written by us, but found on disk)
    code, text = cli(infer_cli.main, ["--ckpt", ckpt, "--input", inp, "--out", out], capsys)
    assert code == 0 and "1 segmented" in text
    assert_complete(out, "a.png", (48, 64))


@pytest.mark.parametrize("case", ["empty_folder", "no_image_extensions", "missing_input", "out_is_a_file", "missing_ckpt"])
def test_infer_nothing_to_do_or_bad_arguments(case, ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    args = ["--ckpt", ckpt, "--input", inp, "--out", out]
    if case == "no_image_extensions":
        (inp / "readme.txt").write_text("hello")
    elif case == "missing_input":
        args[3] = tmp_path / "nope"
    elif case == "out_is_a_file":
        (inp / "a.png").write_bytes(encode(GOOD, ".png"))
        out.write_text("mine")
    elif case == "missing_ckpt":
        (inp / "a.png").write_bytes(encode(GOOD, ".png"))
        args[1] = tmp_path / "nope.safetensors"
    code, text = cli(infer_cli.main, args, capsys)
    expected = {"empty_folder": (1, "no images found"), "no_image_extensions": (1, "no images found"),
                "missing_input": (2, "nope"), "out_is_a_file": (2, "not a folder"), "missing_ckpt": (2, "nope.safetensors")}
    assert (code, expected[case][1] in text) == (expected[case][0], True), text
    assert "Traceback" not in text
    if case == "out_is_a_file":
        assert out.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# eval: ground truth and predictions are validated first; each problem is one line naming the file,
# the record and the problem (exit 2); nothing hangs.


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _valid_case() -> tuple[dict, list]:
    images, anns, preds = [], [], []
    for i, (h, w) in enumerate([(48, 64), (30, 20)]):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        m = np.zeros((h, w), bool)
        m[: h // 2, : w // 2] = True
        for k, mask in enumerate((m, ~m)):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "segmentation": _rle(mask),
                         "area": float(mask.sum()), "bbox": [0, 0, w, h]})
            preds.append({"image_id": i + 1, "category_id": 1, "segmentation": _rle(mask), "score": 0.5 + 0.1 * k})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}, preds


def _set(path, value):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return mutate


def _short_counts(data):  # counts that stop before covering the image (pycocotools hangs on this)
    seg = data["annotations"][1]["segmentation"]
    counts = mask_util.frPyObjects({"size": seg["size"], "counts": [5, 10, 3]}, *seg["size"])["counts"].decode()
    seg["counts"] = counts


GT_PROBLEMS = {
    # name: (mutation of the ground truth, record named, problem named)
    "no_annotations": (_set(["annotations"], KeyError), "'annotations'", "missing"),
    "no_images": (_set(["images"], KeyError), "'images'", "missing"),
    "unrelated_object": (lambda d: d.clear() or d.update({"x": []}), "'images'", "missing"),
    "unknown_image": (_set(["annotations", 2, "image_id"], 99), "annotations[2]", "image id that is not in"),
    "image_id_a_list": (_set(["annotations", 0, "image_id"], [1]), "annotations[0]", "image id that is not in"),
    "short_rle_counts": (_short_counts, "annotations[1]", "not height x width = 3072"),
    "long_rle_list_counts": (_set(["annotations", 0, "segmentation"], {"size": [48, 64], "counts": [3000, 5000]}),
                             "annotations[0]", "sum to 8000"),
    "negative_rle_count": (_set(["annotations", 0, "segmentation"], {"size": [48, 64], "counts": [-5, 3077]}),
                           "annotations[0]", "non-negative"),
    "garbage_rle_string": (_set(["annotations", 0, "segmentation", "counts"], "\u00e9t\u00e9"), "annotations[0]", "not a valid"),
    "rle_wrong_size": (_set(["annotations", 3, "segmentation", "size"], [20, 30]), "annotations[3]", "not the image's"),
    "odd_polygon": (_set(["annotations", 1, "segmentation"], [[1, 2, 3, 4, 5, 6, 7]]), "annotations[1]", "even number"),
    "short_polygon": (_set(["annotations", 1, "segmentation"], [[1, 2, 3, 4]]), "annotations[1]", ">= 6"),
    "nan_polygon": (_set(["annotations", 1, "segmentation"], [[1, 2, 3, float("nan"), 5, 6]]), "annotations[1]", "finite"),
    "no_segmentation": (_set(["annotations", 2, "segmentation"], KeyError), "annotations[2]", "no segmentation"),
    "no_area": (_set(["annotations", 2, "area"], KeyError), "annotations[2]", "'area'"),
    "duplicate_ann_id": (_set(["annotations", 3, "id"], 1), "annotations[3]", "unique integer 'id'"),
    "image_without_size": (_set(["images", 1, "height"], KeyError), "images[1]", "'height'"),
    "duplicate_image_id": (_set(["images", 1, "id"], 1), "images[1]", "duplicate image id"),
}

PRED_PROBLEMS = {
    "unknown_image": (_set([0, "image_id"], 42), "predictions[0]", "not in the ground truth"),
    "image_id_a_string": (_set([0, "image_id"], "1"), "predictions[0]", "not in the ground truth"),
    "nan_score": (_set([1, "score"], float("nan")), "predictions[1]", "not a finite number"),
    "inf_score": (_set([1, "score"], float("inf")), "predictions[1]", "not a finite number"),
    "string_score": (_set([1, "score"], "0.9"), "predictions[1]", "not a finite number"),
    "no_segmentation": (_set([2, "segmentation"], KeyError), "predictions[2]", "no segmentation"),
    "polygon": (_set([2, "segmentation"], [[0, 0, 5, 0, 5, 5]]), "predictions[2]", "not an RLE"),
    "short_rle_counts": (lambda d: _short_counts({"annotations": [None, d[3]]}), "predictions[3]", "not height x width"),
    "uncompressed_rle": (_set([0, "segmentation", "counts"], [3072]), "predictions[0]", "compressed string"),
    "top_level_object": (lambda d: None, "", "must be a list"),
}


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (pycocotools loops on RLE counts that do not cover the image)."""
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("hung"))
    signal.alarm(60)
    yield
    signal.alarm(0)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data, allow_nan=True))
    return path


@pytest.mark.parametrize("entry", ["cli", "api"])
@pytest.mark.parametrize("case", list(GT_PROBLEMS))
def test_eval_refuses_bad_ground_truth(case, entry, tmp_path, capsys, alarm):
    mutate, record, problem = GT_PROBLEMS[case]
    gt, preds = _valid_case()
    mutate(gt)
    gt_path, pred_path = _write(tmp_path / "gt.json", gt), _write(tmp_path / "preds.json", preds)
    before = tree_hashes(tmp_path)
    if entry == "cli":
        code, text = cli(eval_cli.main, ["--data", gt_path, "--preds", pred_path, "--out", tmp_path / "o"], capsys)
        assert code == 2 and text.startswith("error: ") and len(text.strip().splitlines()) == 1, text
        assert not (tmp_path / "o").exists()
    else:
        with pytest.raises(EvaluationInputError) as e:
            evaluate_entities(str(gt_path), preds)
        text = str(e.value)
    assert str(gt_path) in text and record in text and problem in text, text
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("entry", ["cli", "api"])
@pytest.mark.parametrize("case", list(PRED_PROBLEMS))
def test_eval_refuses_bad_predictions(case, entry, tmp_path, capsys, alarm):
    mutate, record, problem = PRED_PROBLEMS[case]
    gt, preds = _valid_case()
    mutate(preds)
    if case == "top_level_object":
        preds = {"predictions": preds}
    gt_path, pred_path = _write(tmp_path / "gt.json", gt), _write(tmp_path / "preds.json", preds)
    if entry == "cli":
        code, text = cli(eval_cli.main, ["--data", gt_path, "--preds", pred_path, "--out", tmp_path / "o"], capsys)
        assert code == 2 and len(text.strip().splitlines()) == 1, text
        assert str(pred_path) in text
    else:
        with pytest.raises(EvaluationInputError) as e:
            evaluate_entities(gt, preds)
        text = str(e.value)
    assert record in text and problem in text, text


@pytest.mark.parametrize("which,text,where", [
    ("data", "", "line 1 column 1"),
    ("data", '{"images": [],\n "annotations": [}\n', "line 2 column 18"),
    ("data", "not json at all", "line 1 column 1"),
    ("preds", '[{"image_id": 1,\n\n "score": 0.5,,}]', "line 3 column 15"),
])
def test_eval_json_syntax_names_file_line_and_column(which, text, where, tmp_path, capsys):
    gt, preds = _valid_case()
    paths = {"data": _write(tmp_path / "gt.json", gt), "preds": _write(tmp_path / "preds.json", preds)}
    paths[which].write_text(text)
    code, out = cli(eval_cli.main, ["--data", paths["data"], "--preds", paths["preds"]], capsys)
    assert code == 2 and str(paths[which]) in out and "not valid JSON" in out and where in out, out


def test_eval_ground_truth_not_an_object(tmp_path, capsys):
    path = _write(tmp_path / "gt.json", [1, 2])
    code, out = cli(eval_cli.main, ["--data", path, "--preds", tmp_path / "p.json"], capsys)
    assert code == 2 and str(path) in out and "top level must be an object" in out, out


def test_eval_missing_ground_truth_file(tmp_path, capsys):
    code, out = cli(eval_cli.main, ["--data", tmp_path / "gone.json", "--preds", tmp_path / "p.json"], capsys)
    assert code == 2 and str(tmp_path / "gone.json") in out and "cannot read the ground truth" in out


def test_eval_valid_files_still_score(tmp_path, capsys):
    gt, preds = _valid_case()
    code, out = cli(eval_cli.main, ["--data", _write(tmp_path / "gt.json", gt), "--preds", _write(tmp_path / "p.json", preds),
                                    "--out", tmp_path / "o"], capsys)
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["AP"] == pytest.approx(100.0)


# eval with a model: unreadable images are reported (exit 1), an unreadable folder is an error (exit 2).

@pytest.fixture
def eval_set(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    gt, _ = _valid_case()
    for im in gt["images"]:
        (images / im["file_name"]).write_bytes(encode(smooth(im["height"], im["width"]), ".png"))
    return gt, images


@pytest.mark.parametrize("case", ["truncated", "missing", "size_not_as_annotated", "sliver_and_1x1"])
def test_eval_with_model_image_failures(case, eval_set, ckpt, tmp_path, capsys, monkeypatch):
    from cropformer import cpu_share

    calls = []  # on CPU the thread count is re-checked per image and given back at the end (test_cpu_share.py)
    for name in ("update", "restore"):
        real = getattr(cpu_share.ThreadShare, name)
        monkeypatch.setattr(cpu_share.ThreadShare, name, lambda self, _n=name, _f=real: calls.append(_n) or _f(self))
    gt, images = eval_set
    if case == "truncated":
        data = (images / "1.png").read_bytes()
        (images / "1.png").write_bytes(data[: len(data) // 2])
    elif case == "missing":
        (images / "1.png").unlink()
    elif case == "size_not_as_annotated":
        (images / "1.png").write_bytes(encode(smooth(31, 20), ".png"))
    else:  # every image that decodes is evaluated, whatever its size
        gt["images"] += [{"id": 3, "file_name": "s.png", "height": 3, "width": 5000},
                         {"id": 4, "file_name": "p.png", "height": 1, "width": 1}]
        (images / "s.png").write_bytes(encode(smooth(3, 5000), ".png"))
        (images / "p.png").write_bytes(encode(smooth(1, 1), ".png"))
    gt_path = _write(tmp_path / "gt.json", gt)
    before = tree_hashes(images)
    code, out = cli(eval_cli.main, ["--ckpt", ckpt, "--data", gt_path, "--images", images, "--out", tmp_path / "o",
                                    "--device", "cpu"], capsys)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "AP^e" in out and tree_hashes(images) == before
    if case == "sliver_and_1x1":
        assert code == 0 and metrics["failed"] == [] and metrics["images"] == 4, out
        assert calls == ["update"] * 4 + ["restore"], calls
        return
    assert code == 1 and str(images / "1.png") in out
    (failure,) = metrics["failed"]
    assert failure["path"] == str(images / "1.png") and failure["stage"] == "decode"
    reason = {"truncated": "truncated", "missing": "file not found", "size_not_as_annotated": "differs from the annotated"}[case]
    assert reason in failure["reason"]
    assert {p["image_id"] for p in json.loads((tmp_path / "o" / "predictions.json").read_text())} <= {1}


@pytest.mark.parametrize("case", ["missing_folder", "file_not_folder"])
def test_eval_unreadable_image_folder_is_an_error(case, eval_set, ckpt, tmp_path, capsys):
    gt, images = eval_set
    folder = tmp_path / "nope" if case == "missing_folder" else images / "0.png"
    code, out = cli(eval_cli.main, ["--ckpt", ckpt, "--data", _write(tmp_path / "gt.json", gt), "--images", folder,
                                    "--out", tmp_path / "o"], capsys)
    assert code == 2 and str(folder) in out and "cannot read the image folder" in out, out
    assert not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------
# Python API: Segmenter.generate / segment on any size; bad arrays are a plain ValueError.

@pytest.fixture(scope="module")
def segmenter(ckpt):
    return Segmenter.from_checkpoint(ckpt, mode="full_crops")


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (2, 3), (3, 50000), (50000, 3), (24, 15000)])
def test_api_generate_any_size(hw, segmenter):
    image = smooth(*hw)
    copy_ = image.copy()
    records = segmenter.generate(image)
    entities = segmenter.segment(image)
    assert entities.id_map.shape == hw and np.array_equal(image, copy_)
    for r in records:
        assert r["segmentation"]["size"] == list(hw) and 0.0 <= r["stability_score"] <= 1.0
        assert mask_util.area(r["segmentation"]) == r["area"] > 0


@pytest.mark.parametrize("image,problem", [
    (np.zeros((10, 12, 3), np.float32), "uint8"),
    (np.zeros((10, 12), np.uint8), "H x W x 3"),
    (np.zeros((10, 12, 4), np.uint8), "H x W x 3"),
    (np.zeros((0, 12, 3), np.uint8), "empty"),
    ([[0, 0, 0]], "H x W x 3"),
])
def test_api_bad_arrays(image, problem, segmenter):
    with pytest.raises(ValueError, match=problem):
        segmenter.generate(image)


def test_api_evaluate_refuses_a_prediction_of_an_unknown_image():
    gt, preds = _valid_case()
    preds.append(copy.deepcopy(preds[0]) | {"image_id": 7})
    with pytest.raises(EvaluationInputError, match=r"predictions\[4\] \(image_id 7\): refers to an image id"):
        evaluate_entities(gt, preds)
