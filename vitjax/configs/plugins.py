"""Issue 14's Fashion-MNIST runs: the ViT job (configs/vit.py: same model size, steps, batch and
optimizer) with one plug-in switched on (DESIGN.md, decision 13).

    python -m vitjax.main --config=configs/plugins.py:posemb=learn       # vit.py + evals at 20/28/36
    python -m vitjax.main --config=configs/plugins.py:posemb=resformer   # + local PE, trained at 28/20/16
    python -m vitjax.main --config=configs/plugins.py:posemb=rpe2d
    python -m vitjax.main --config=configs/plugins.py:reduction=ltm,keep=0.5      # also iared2, random
    python -m vitjax.main --config=configs/plugins.py:reduction=iared2,keep=0.5,finetune \\
        --config.init_from=PARAMS_DIR     # IA-RED²'s two phases from a trained ViT's weights
    python -m vitjax.main --config=configs/plugins.py:norm=dtn

Arguments (comma-separated, combinable; `runlocal` shrinks to a smoke test):
  posemb=learn|resformer|rpe2d  the positions. Every posemb run is trained at 28 px and evaluated at
                                EVAL_RESOLUTIONS; 'resformer' is ResFormer's recipe: its global
                                positions, the local PE in attention (mixer_kwargs local_pe=True)
                                and multi-resolution training at 28/20/16 px (the paper's 224/160/128
                                scaled to 28) with the scale-consistency loss.
  reduction=ltm|iared2|random   a token reducer before block `block` (default 1, after the first
  keep=0.5                      block), keeping `keep` of the patch tokens. 'ltm' trains with the
                                LTM repository's IB term (config.ib, weight 0.1, the repository's;
                                the merging module's own label-free term off, and the pre-logits
                                read with feature_blocks=(0,), the block before the reducer).
  finetune                      IA-RED²'s schedule from trained weights (config.init_from, every
                                entry but the reducer loaded): PHASE1_STEPS steps training only the
                                interpreters, then joint fine-tuning, FINETUNE_STEPS in all.
  norm=ln|dtn                   the blocks' norm.
  penalty=1.0                   IA-RED²: the reward of a wrong prediction is -penalty
                                (config.policy.penalty; BlockDrop's 1 by default).
  multires=auto|on|off          ResFormer's multi-resolution recipe (train_resolutions 28/20/16 with
                                the scale-consistency loss); auto = on for posemb=resformer only,
                                on/off separate the recipe from the positions (ablations).
"""
from vitjax import choices
from vitjax.configs import common
from vitjax.configs import vit

POSEMBS = ("learn", "resformer", "rpe2d")
REDUCTIONS = ("none", "ltm", "iared2", "random")
NORMS = ("ln", "dtn")
MULTIRES = ("auto", "on", "off")
EVAL_RESOLUTIONS = (20, 28, 36)
RESFORMER_RESOLUTIONS = (28, 20, 16)  # 224 / 160 / 128 px at 28/224 scale
PHASE1_STEPS = 500
FINETUNE_STEPS = 1500


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, posemb="learn", reduction="none", keep=0.5, block=1,
                         finetune=False, norm="ln", multires="auto", penalty=1.0)
  choices.check("posemb", arg.posemb, POSEMBS)
  choices.check("reduction", arg.reduction, REDUCTIONS)
  choices.check("norm", arg.norm, NORMS)
  choices.check("multires", arg.multires, MULTIRES)
  c = vit.get_config("runlocal" if arg.runlocal else None)
  if arg.posemb != "learn" or arg.reduction == "none" and arg.norm == "ln":
    c.eval_resolutions = EVAL_RESOLUTIONS
  if arg.posemb != "learn":
    c.model.posemb = arg.posemb
  if arg.posemb == "rpe2d":
    # RPE-2D's range L: twice the 7x7 training grid, so every eval grid (up to 9x9 at 36 px) is
    # inside the trained range.
    c.model.posemb_kwargs = dict(range=14)
  if arg.posemb == "resformer":
    c.model.mixer_kwargs = dict(local_pe=True)
  if arg.multires == "on" or arg.multires == "auto" and arg.posemb == "resformer":
    c.train_resolutions = RESFORMER_RESOLUTIONS
  if arg.norm != "ln":
    c.model.norm = arg.norm
  if arg.reduction != "none":
    c.model.token_reduction = arg.reduction
    c.model.reduction_blocks = (arg.block,)
    c.model.keep_ratio = arg.keep
  if arg.reduction == "ltm":
    c.ib.weight = 0.1
    c.model.reduction_kwargs = dict(ib_weight=0.0)
    c.model.feature_blocks = (arg.block - 1,) if arg.block > 0 else None
  if arg.penalty != 1.0:
    if arg.reduction != "iared2":
      raise ValueError(f"config argument penalty is IA-RED²'s reward: it needs reduction=iared2, "
                       f"not reduction={arg.reduction!r}")
    c.policy.penalty = arg.penalty
  if arg.finetune:
    if arg.reduction != "iared2":
      raise ValueError(f"config argument finetune is IA-RED²'s schedule: it needs "
                       f"reduction=iared2, not reduction={arg.reduction!r}")
    c.init_from_skip = "tokenreducer_"   # the interpreters start fresh, the head is loaded
    c.total_steps = FINETUNE_STEPS
    c.policy.phase1_steps = PHASE1_STEPS
    c.lr, c.warmup_steps = 5e-4, 100
    if arg.runlocal:
      common.runlocal(c)
      c.policy.phase1_steps = c.total_steps // 2
  return c
