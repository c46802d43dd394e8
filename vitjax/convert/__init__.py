"""Weight converters: timm (PyTorch) state dicts and big_vision / vit_jax `.npz` files -> vitjax.

    from vitjax import convert
    model, variables, meta = convert.from_timm(torch_state_dict, "vit_base_patch16_224")
    model, variables, meta = convert.from_big_vision_npz("B_16.npz", "vit_b16")
    model, variables, meta = convert.from_transformers(hf_state_dict, "cvt_13")  # + batch_stats
    model, variables, meta = convert.from_official(official_state_dict, "hornet_t")

Command line (writes a parameter checkpoint that `--config.init_from=DIR` fine-tunes from):

    python -m vitjax.convert --from=timm --model=vit_base_patch16_224 --checkpoint=FILE --out=DIR
    python -m vitjax.convert --from=big_vision --model=vit_b16 --checkpoint=FILE.npz --out=DIR

Conversions are strict: unknown keys, missing parameters and shape mismatches are listed together
in one ValueError and nothing is loaded. The supported timm families are the `FAMILIES` table in
`vitjax/convert/timm.py`; adding a family is adding an entry there. The transformers families are
the `FAMILIES` table in `vitjax/convert/transformers.py` (`convert.transformers.FAMILIES`). The
official-code families (the authors' own key names) are the `FAMILIES` table in
`vitjax/convert/official/` (one module per repository).
"""
from vitjax.convert.big_vision import from_big_vision_npz, from_big_vision_state  # noqa: F401
from vitjax.convert.files import load_state_dict  # noqa: F401
from vitjax.convert.mapping import Converted  # noqa: F401
from vitjax.convert.official import from_official  # noqa: F401
from vitjax.convert.timm import FAMILIES, from_timm, supported_models  # noqa: F401
from vitjax.convert.transformers import from_transformers  # noqa: F401
