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

The functions are imported eagerly: a lazy `__getattr__` would be shadowed by the submodule of the
same name (`ms_deform_attn`) once anything imports that submodule. Kernel modules (`kernels/`,
`torch.ops.cropformer_C`) are still loaded only when a fast path is first used.
"""
from .masked_attention import masked_cross_attention
from .ms_deform_attn import ms_deform_attn
from .paste import paste_entities
from .point_mask import point_mask_cost, point_mask_loss, sample_uncertain_points
from .rle import id_map_to_rle

__all__ = [
    "ms_deform_attn",
    "masked_cross_attention",
    "point_mask_cost",
    "point_mask_loss",
    "sample_uncertain_points",
    "paste_entities",
    "id_map_to_rle",
]
