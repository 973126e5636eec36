"""Hot ops, each with ONE dispatch point (``backend="auto"|"torch"|"triton"|"cuda"|"cpu"``) and its
readable torch reference (the definition of correctness) in the same module.

| op                        | module                   |
|---------------------------|--------------------------|
| ms_deform_attn            | ops/ms_deform_attn.py    |
| masked_cross_attention    | ops/masked_attention.py  |
| point_mask_cost / _loss,  | ops/point_mask.py        |
| sample_uncertain_points   |                          |
| paste_entities            | ops/paste.py             |
| id_map_to_rle             | ops/rle.py               |

Modules are imported on first use so that importing `cropformer.ops` stays cheap.
"""
import importlib

_OPS = {
    "ms_deform_attn": "ms_deform_attn",
    "masked_cross_attention": "masked_attention",
    "point_mask_cost": "point_mask",
    "point_mask_loss": "point_mask",
    "sample_uncertain_points": "point_mask",
    "paste_entities": "paste",
    "id_map_to_rle": "rle",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        module = importlib.import_module(f"{__name__}.{_OPS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
