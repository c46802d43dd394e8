"""Model families. Every family module is imported here explicitly so its registrations run."""
from vitjax.models import mixers  # noqa: F401  (registers 'mhsa')
from vitjax.models import backbone  # noqa: F401  (registers the 'vit' block)
from vitjax.models import rpe_mixers  # noqa: F401  (krpe_fft, urpe, gmm_mask)
from vitjax.models import spectral_mixers  # noqa: F401  (spectral_gating, hyena_nd, gnconv)
from vitjax.models import vit  # noqa: F401
from vitjax.models import lookupvit  # noqa: F401
from vitjax.models import spectformer  # noqa: F401
from vitjax.models import hornet  # noqa: F401
from vitjax.models import cvt  # noqa: F401  (registers 'conv_proj_attn', the 'cvt' block)
from vitjax.models import convnext  # noqa: F401
from vitjax.models import swin  # noqa: F401  (registers 'window_attn', the 'swin' block)
from vitjax.models import cswin  # noqa: F401  (registers 'cswin' mixer and block)
from vitjax.models import rmt  # noqa: F401  (registers 'manhattan_attn', the 'rmt' block, 'conv_bn')
from vitjax.models import soft  # noqa: F401  (registers 'soft_attn', the 'soft' block)
from vitjax.models import vir  # noqa: F401  (registers the 'retention' mixer, vir_s16, vir_b16)
from vitjax.models import t2t  # noqa: F401  (T2T-ViT: t2t_vit_*, soft split, Performer)
from vitjax.models import sret  # noqa: F401  (registers 'sliced_group_attn', the 'sret' block)
from vitjax.models import crossvit  # noqa: F401  (registers 'cls_cross_attn', the 'crossvit' block)
from vitjax.models import pvt  # noqa: F401  (ShiftAddViT: 'shiftadd_attn', 'shift_mlp', its PVTv2 models)
from vitjax.models import token_reduction  # noqa: F401  (token_reduction='random', ...)
from vitjax.models import dtn  # noqa: F401  (norm='dtn', vit_ti16_star_dtn)
from vitjax.models import reparam  # noqa: F401  (the 'vit_parallel' block, merge)
from vitjax.models import resformer  # noqa: F401  (posemb='resformer', resformer_*_patch16)
from vitjax.models import rpe2d  # noqa: F401  (posemb='rpe2d')
from vitjax.models import group_pe  # noqa: F401  (registers 'prope_attn')
from vitjax.models.registry import create_model, list_mixers, list_models  # noqa: F401
