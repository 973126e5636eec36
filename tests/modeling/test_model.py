"""The assembled network: key parity with the original's released configs, golden outputs of the
original implementation, shapes, gradients, weight sharing and input errors."""
from __future__ import annotations

import pytest
import torch

from cropformer.config import load_config
from cropformer.convert import original_to_ours, ours_to_original
from cropformer.modeling.build import build_model
from tests.conftest import assert_close, load_reference, reference_dir


def _reference_keys(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    keys = {}
    for line in (reference_dir("keys") / f"{name}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        keys[key] = (tuple(int(s) for s in shape.split(",")), dtype)
    return keys


# (our config, the original's key list it must reproduce; None = derived from the CropFormer list)
KEY_CASES = [
    ("cropformer_swin_tiny_3x", "cropformer_swin_tiny_3x"),
    ("cropformer_swin_large_3x", "cropformer_swin_large_3x"),
    ("mask2former_swin_tiny_3x", "mask2former_swin_tiny_3x"),
    ("swin_t_1x", "cropformer_swin_tiny_3x"),
    ("mask2former_swin_large_3x", None),
]


@pytest.mark.parametrize("config,reference", KEY_CASES)
def test_state_dict_matches_original_keys(config, reference):
    cfg = load_config(config)
    with torch.device("meta"):
        model = build_model(cfg.model)
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in ours_to_original(model.state_dict()).items()}
    if reference is None:  # no dump exists for Mask2Former Swin-L: CropFormer Swin-L minus make_3d
        ref = {k: v for k, v in _reference_keys("cropformer_swin_large_3x").items() if ".make_3d." not in k}
    else:
        ref = _reference_keys(reference)
    ref = {k: v for k, v in ref.items() if not k.startswith("criterion")}
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    wrong = [(k, ours[k], ref[k]) for k in ref if ours[k] != ref[k]]
    assert not wrong, f"shape/dtype mismatches: {wrong[:10]}"


def _golden_model():
    from safetensors.torch import load_file

    state = load_file(str(reference_dir("golden_tiny") / "tiny_state_dict.safetensors"))
    ours, report = original_to_ours(state)
    assert not report.unrecognised
    model = build_model(load_config("tiny").model)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def _stack_predictions(out: dict, key: str) -> torch.Tensor:
    return torch.stack([a[key] for a in out["aux_outputs"]] + [out[key]])


def test_golden_training_forward():
    """Every intermediate of the original's training forward (full view + one crop), to 1e-4."""
    model = _golden_model()
    inp = load_reference("golden_tiny", "inputs.pt")
    ref = load_reference("golden_tiny", "outputs.pt")
    full, crop = inp["train.image"], inp["train.image_crop"][0]
    H, W = 128, 192
    images = torch.zeros(1, 2, 3, H, W, dtype=torch.uint8)
    images[0, 0, :, :, : full.shape[-1]] = full
    images[0, 1, :, :, : crop.shape[-1]] = crop
    sizes = torch.tensor([[[128, full.shape[-1]], [128, crop.shape[-1]]]])
    with torch.no_grad():
        x = model.preprocess(images, sizes)
        feats = model.image_encoder(x)
        for name in ("res2", "res3", "res4", "res5"):
            assert_close(feats[name], ref[f"train.backbone.{name}"], atol=1e-4, rtol=1e-4, name=name)
        out = model(images, sizes)
    img, bat = out["image"], out["batch"]
    assert_close(_stack_predictions(img, "pred_logits"), ref["train.decoder_2d.pred_logits"], atol=1e-4, rtol=1e-4, name="2d logits")
    assert_close(_stack_predictions(img, "pred_masks"), ref["train.decoder_2d.pred_masks"], atol=1e-4, rtol=1e-4, name="2d masks")
    assert_close(out["association"].transpose(0, 1), ref["train.make_3d_output"], atol=1e-4, rtol=1e-4, name="association")
    assert_close(_stack_predictions(bat, "pred_logits"), ref["train.decoder_3d.pred_logits"], atol=1e-4, rtol=1e-4, name="3d logits")
    assert_close(_stack_predictions(bat, "pred_masks"), ref["train.decoder_3d.pred_masks"], atol=1e-4, rtol=1e-4, name="3d masks")


@pytest.mark.parametrize("masks", ["all", "last"])
def test_golden_inference_forward(masks):
    """The original's five-view inference forward (full image + 4 corner crops), to 1e-4; with
    masks="last" (what `Segmenter` runs: attention masks from resized features, no intermediate
    full-size masks) the same final outputs."""
    model = _golden_model()
    inp = load_reference("golden_tiny", "inputs.pt")
    ref = load_reference("golden_tiny", "outputs.pt")
    images = torch.zeros(1, 5, 3, 160, 224, dtype=torch.uint8)
    images[0, 0] = inp["infer.image"]
    images[0, 1:, :, :, :223] = inp["infer.image_crop"]
    sizes = ref["infer.image_sizes"].view(1, 5, 2)
    with torch.no_grad():
        out = model(images, sizes, masks=masks)
    assert_close(_stack_predictions(out["image"], "pred_logits"), ref["infer.decoder_2d.pred_logits"], atol=1e-4, rtol=1e-4, name="2d logits")
    if masks == "all":
        assert_close(_stack_predictions(out["image"], "pred_masks"), ref["infer.decoder_2d.pred_masks"], atol=1e-4, rtol=1e-4, name="2d masks")
    else:  # the image decoder's masks are not the output when the batch decoder runs
        assert out["image"]["pred_masks"] is None
        assert all(a["pred_masks"] is None for level in ("image", "batch") for a in out[level]["aux_outputs"])
    assert_close(out["association"].transpose(0, 1), ref["infer.make_3d_output"], atol=1e-4, rtol=1e-4, name="association")
    assert_close(_stack_predictions(out["batch"], "pred_logits"), ref["infer.decoder_3d.pred_logits"], atol=1e-4, rtol=1e-4, name="3d logits")
    assert_close(out["batch"]["pred_masks"], ref["infer.decoder_3d.pred_masks_last"], atol=1e-4, rtol=1e-4, name="3d masks")


@pytest.mark.parametrize("batch_decoder", [False, True])
def test_masks_last_matches_all(batch_decoder):
    """masks="last" gives the final outputs of masks="all" on a random model, odd sizes, B = 2, fp32 to
    1e-5 and float64 to 1e-12 (the attention masks come from resized features: the same logits in
    another order)."""
    torch.manual_seed(1)
    model = build_model(load_config("tiny").model).eval()
    images = torch.randint(0, 256, (2, 3, 3, 97, 131), dtype=torch.uint8)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = model.to(dtype)
        with torch.no_grad():
            ref = model(images, run_batch_decoder=batch_decoder)
            out = model(images, run_batch_decoder=batch_decoder, masks="last")
        level = "batch" if batch_decoder else "image"
        for key in ("pred_logits", "pred_masks"):
            assert_close(out[level][key], ref[level][key], atol=tol, rtol=tol, name=f"{level} {key} {dtype}")
        assert_close(_stack_predictions(out["image"], "pred_logits"), _stack_predictions(ref["image"], "pred_logits"),
                     atol=tol, rtol=tol, name=f"image decoder logits {dtype}")
        assert all(a["pred_masks"] is None for a in out[level]["aux_outputs"])
    with pytest.raises(ValueError, match="masks must be"):
        model(images, masks="final")


def test_batch_decoder_reuses_image_key_values():
    """The batch decoder fed the image decoder's key/value projections (what CropFormer.forward does) gives
    what it computes from the memories itself: outputs in fp32 and float64 to 1e-5 and 1e-7, B = 2, odd
    sizes, and in training every parameter's gradient (the shared projections get both decoders' share).
    float64 is not closer because the memory path sums the 2D and view encodings in float32 (as the
    original) before the cast, the shared path adds the view term in the model's dtype."""
    torch.manual_seed(4)
    model = build_model(load_config("tiny").model)
    images = torch.randint(0, 256, (2, 3, 3, 97, 131), dtype=torch.uint8)
    B, T = images.shape[:2]
    projections = []  # one entry per key/value projection made
    for layer in model.image_decoder.transformer_cross_attention_layers:
        layer.project_kv = lambda key, value, _f=layer.project_kv: projections.append(1) or _f(key, value)

    def batch_outputs(share: bool):
        x = model.preprocess(images)
        mask_features, levels = model.encode(x)
        kv = [] if share else None
        image = model.image_decoder(levels, mask_features, kv_out=kv)
        init = model.association(image["query_features"].unflatten(0, (B, T)), model.image_decoder.query_embed.weight)
        return model.batch_decoder(levels, mask_features, init, T, image_kv=kv)

    layers = len(model.image_decoder.transformer_cross_attention_layers)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-7)):
        model = model.to(dtype).eval()
        with torch.no_grad():
            projections.clear()
            ref = batch_outputs(False)
            assert len(projections) == 2 * layers
            projections.clear()
            out = batch_outputs(True)
            assert len(projections) == layers  # the batch decoder projects nothing
        for key in ("pred_logits", "pred_masks"):
            assert_close(out[key], ref[key], atol=tol, rtol=tol, name=f"{key} {dtype}")
        assert_close(_stack_predictions(out, "pred_masks"), _stack_predictions(ref, "pred_masks"), atol=tol, rtol=tol,
                     name=f"every layer's masks {dtype}")
    model = model.double().train()
    grads = []
    for share in (False, True):
        model.zero_grad()
        out = batch_outputs(share)
        (out["pred_logits"].square().sum() + _stack_predictions(out, "pred_masks").sin().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        scale = grads[0][name].abs().max().item()  # relative to the tensor: entries cancel to near zero
        assert_close(grads[1][name], grads[0][name], atol=1e-6 * scale, rtol=1e-6, name=f"grad {name}")


def test_cpu_inference_encodes_view_by_view():
    """On CPU without autograd the backbone and pixel decoder run once per view (faster: cache), with the
    batched outputs; with autograd (training) the views stay one batch."""
    torch.manual_seed(2)
    model = build_model(load_config("tiny").model).eval()
    calls = []
    model.image_encoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    x = model.preprocess(torch.randint(0, 256, (1, 3, 3, 96, 130), dtype=torch.uint8))
    batched = model.encode(x)
    assert calls == [3]
    with torch.no_grad():
        per_view = model.encode(x)
    assert calls == [3, 1, 1, 1]
    assert_close(per_view[0], batched[0].detach(), atol=1e-5, rtol=1e-5, name="mask features")
    for i, (a, b) in enumerate(zip(per_view[1], batched[1])):
        assert_close(a, b.detach(), atol=1e-5, rtol=1e-5, name=f"level {i}")


@pytest.mark.parametrize("T", [2, 5])
def test_tiny_forward_backward_shapes_and_gradients(T):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_model(cfg.model).train()
    H, W = 96, 130  # not multiples of 32: padded inside
    images = torch.randint(0, 256, (1, T, 3, H, W), dtype=torch.uint8)
    out = model(images)
    Q = cfg.model.decoder.num_queries
    Hp, Wp = 96, 160
    assert out["image"]["pred_logits"].shape == (T, Q, 2)
    assert out["image"]["pred_masks"].shape == (T, Q, Hp // 4, Wp // 4)
    assert len(out["image"]["aux_outputs"]) == cfg.model.decoder.dec_layers - 1
    assert out["batch"]["pred_logits"].shape == (1, Q, 2)
    assert out["batch"]["pred_masks"].shape == (1, Q, T, Hp // 4, Wp // 4)
    loss = sum(o["pred_masks"].float().pow(2).mean() + o["pred_logits"].float().pow(2).mean()
               for level in ("image", "batch") for o in [out[level], *out[level]["aux_outputs"]])
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("association."))


def test_batch_decoder_shares_image_decoder_parameters():
    model = build_model(load_config("tiny").model)
    assert not any(k.startswith("batch_decoder") for k in model.state_dict())
    assert sum(1 for _ in model.batch_decoder.parameters()) == 0
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))
    # CropFormer adds only the association module's parameters to Mask2Former.
    base = build_model(load_config("tiny", ["model.meta_architecture=\"mask2former\""]).model)
    extra = {n for n, _ in model.named_parameters()} - {n for n, _ in base.named_parameters()}
    assert extra and all(n.startswith("association.") for n in extra)


@pytest.mark.slow
def test_swin_tiny_512_forward_backward_T2_and_inference_T5():
    torch.manual_seed(0)
    model = build_model(load_config("cropformer_swin_tiny_3x").model)
    images = torch.randint(0, 256, (1, 2, 3, 512, 512), dtype=torch.uint8)
    out = model.train()(images)
    assert out["batch"]["pred_masks"].shape == (1, 100, 2, 128, 128)
    (out["batch"]["pred_masks"].mean() + out["image"]["pred_masks"].mean()).backward()
    with torch.no_grad():
        out = model.eval()(torch.randint(0, 256, (1, 5, 3, 512, 512), dtype=torch.uint8))
    assert out["batch"]["pred_masks"].shape == (1, 100, 5, 128, 128)
    assert out["image"]["pred_masks"].shape == (5, 100, 128, 128)


def test_bad_inputs_give_clear_errors():
    model = build_model(load_config("tiny").model).eval()
    with pytest.raises(ValueError, match="B x T x 3 x H x W"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="smaller than the model's stride"):
        model(torch.zeros(1, 1, 3, 16, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        model(torch.zeros(1, 1, 3, 64, 64, dtype=torch.int32))
