"""Golden fixtures for T2T-ViT from the authors' code (yitu-opensource/T2T-ViT, models/t2t_vit.py;
DESIGN.md, decision 12).

    python -m experiments.golden.t2t --repo=/path/to/T2T-ViT                   # reduced: writes
    python -m experiments.golden.t2t --git-dir=/path/to/repo.git --commit=0f63dc9  # from git
    python -m experiments.golden.t2t --repo=... --full                         # full size

Builds the official `T2T_ViT` in this Python (torch and timm, the imports of the official files,
timm through tests/torch_compat.py), draws seeded random weights perturbed away from their init
(every trained parameter: norm weights and biases get N(0, 0.2) noise, other tensors noise of
std max(0.5 std, 0.5 / sqrt(fan_in)); values rounded to float16 precision so the fixture stores
half the bytes), runs a fixed input in eval mode, converts the state dict with
`vitjax.convert.from_official` and prints max|logits_vitjax - logits_official|. The two frozen
tensors stay as the official code makes them: the sinusoid `pos_embed` (kept in float32: vitjax
checks it against its own table) and the Performer's random features `w` (seeded orthogonal
draws, rounded to float16 values like the parameters).

  * reduced (default): 48 px (T2T grids 12x12, 6x6, 3x3), token_dim 16, depth 2, 10 classes, for
    both T2T layer types: the Performer (official default) as tests/golden/t2t_vit_7.npz (embed 32,
    2 heads, MLP ratio 2) and the transformer as tests/golden/t2t_vit_t_14.npz (embed 48, 3 heads,
    MLP ratio 3). Each holds the state dict ('state/<key>'), the input ('images', NHWC), the
    logits, the official commit id, repository, file and constructor, and the create_model
    overrides the weights do not show ('overrides', JSON: num_heads), the layout of
    experiments/golden/make.py's fixtures.
  * --full: t2t_vit_7 and t2t_vit_14 at 224 px (batch 2; --models picks others); writes nothing,
    reports each official parameter count (all parameters, and the trainable ones).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import types

import numpy as np

from experiments.golden import common

REPOSITORY = "yitu-opensource/T2T-ViT"
FILES = ("models/t2t_vit.py", "models/token_performer.py", "models/token_transformer.py",
         "models/transformer_block.py")

# vitjax model -> (official T2T_ViT kwargs of the reduced model, create_model overrides).
REDUCED = {
    "t2t_vit_7": (dict(img_size=48, tokens_type="performer", embed_dim=32, depth=2, num_heads=2,
                       mlp_ratio=2.0, token_dim=16, num_classes=10), dict(num_heads=2)),
    "t2t_vit_t_14": (dict(img_size=48, tokens_type="transformer", embed_dim=48, depth=2,
                          num_heads=3, mlp_ratio=3.0, token_dim=16, num_classes=10),
                     dict(num_heads=3)),
}


def import_official(models_dir: str):
  """torch and the official `t2t_vit` module, imported as a package from `models_dir` without
  running its __init__ (which imports the other variants)."""
  torch, _ = common.import_torch_and_timm()
  package = types.ModuleType("official_t2t")
  package.__path__ = [models_dir]
  sys.modules["official_t2t"] = package
  return torch, importlib.import_module("official_t2t.t2t_vit")


def perturb(torch, model, seed: int):
  """Seeded values for every trained parameter, away from the init, rounded to float16; the
  random features only rounded, the sinusoid table left as it is (common.perturb's rules for
  the trained ones, without its noise draw for the frozen two)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "pos_embed":
        continue
      if name.endswith(".w"):
        p.copy_(p.half().float())
        continue
      noise = torch.randn(p.shape, generator=gen)
      if p.numel() == 1 or float(p.std()) < 1e-6:        # norm weights, biases
        p.add_(0.2 * noise)
      else:
        fan_in = p.numel() // p.shape[0]
        p.add_(max(0.5 * float(p.std()), 0.5 / fan_in ** 0.5) * noise)
      p.copy_(p.half().float())


def run(models_dir: str, commit: str, *, full: bool, models, seed: int = 0,
        out_dir: str = common.GOLDEN) -> list[dict]:
  torch, official = import_official(models_dir)
  results = []
  for name in models:
    torch.manual_seed(seed)
    if full:
      model, size, overrides, ctor = getattr(official, name)(), 224, {}, name
    else:
      kwargs, overrides = REDUCED[name]
      model, size, ctor = official.T2T_ViT(**kwargs), kwargs["img_size"], "T2T_ViT"
    model.eval()
    perturb(torch, model, seed + 1)
    images = np.random.default_rng(seed + 2).standard_normal((2, 3, size, size))
    images = images.astype(np.float16).astype(np.float32)
    with torch.no_grad():
      logits = model(torch.from_numpy(images)).numpy()
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    fixture = {f"state/{k}": v if k == "pos_embed" else v.astype(np.float16)
               for k, v in state.items()}
    fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                   **common.metadata(commit=commit, repository=REPOSITORY,
                                     source_file=", ".join(FILES), official=ctor, model=name,
                                     overrides=overrides))
    params = list(model.named_parameters())
    out = {"model": name, "official": ctor, "full": full, "input": [2, 3, size, size],
           "params": sum(p.numel() for _, p in params),
           "trainable": sum(p.numel() for _, p in params if p.requires_grad),
           "max_abs_logit": float(np.abs(logits).max()),
           "max_abs_diff": common.compare(fixture)}
    if not full:
      common.save(fixture, f"{name}.npz", out, out_dir)
    print(json.dumps(out), flush=True)
    results.append(out)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_source_flags(parser, REPOSITORY)
  parser.add_argument("--models", default=None,
                      help="comma-separated vitjax names (default: t2t_vit_7 and t2t_vit_t_14 "
                           "reduced, t2t_vit_7 and t2t_vit_14 full size)")
  args = parser.parse_args(argv)
  default = "t2t_vit_7,t2t_vit_14" if args.full else ",".join(REDUCED)
  models = [m for m in (args.models or default).split(",") if m]
  unknown = [m for m in models if not args.full and m not in REDUCED]
  if unknown:
    parser.error(f"--models: no reduced model for {unknown}; allowed: {', '.join(REDUCED)}")
  with common.official_files(args, FILES) as (root, commit):
    run(f"{root}/models", commit, full=args.full, models=models, out_dir=args.out)


if __name__ == "__main__":
  main()
