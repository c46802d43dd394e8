"""Golden fixture for ResFormer from the authors' code (ruitian12/resformer,
image_classification/models.py; DESIGN.md, decision 12).

    python -m experiments.golden.resformer --repo=/path/to/resformer                 # reduced
    python -m experiments.golden.resformer --git-dir=/path/to/repo.git --commit=33e2c09
    python -m experiments.golden.resformer --repo=... --full                         # full size

Builds the official `ResFormer` in this Python (torch and timm 1.0.x, the imports of the official
file), draws seeded random weights perturbed away from their init with
`experiments.golden.make.perturb` (every parameter: the zero-initialised local-PE convolutions
`get_v` and the norms get N(0, 0.2) noise, every value rounded to float16 precision), runs fixed
inputs at two resolutions through it in eval mode (the official code takes any square multiple
of the patch size: the global PE's sin-cos table and both convolutions follow the grid), converts
the state dict with `vitjax.convert.from_official` and prints max|logits_vitjax - logits_official|
at each.

  * reduced (default): `ResFormer(patch_size=8, embed_dim=32, depth=2, num_heads=2,
    mlp_ratio=2, num_classes=10)` at 32 px (a 4x4 grid: 'images', 'logits', what
    tests/test_official.py checks) and 56 px (7x7: 'images_2', 'logits_2', checked by
    tests/test_resformer.py). Writes tests/golden/resformer_tiny_patch16.npz in the layout of
    experiments/golden/make.py's fixtures (state dict 'state/<key>', official commit id,
    repository, file, constructor, 'overrides' JSON).
  * --full: resformer_tiny_patch16 (batch 2) at 224, 160 and 128 px (the paper's training
    resolutions) and 384 px; writes nothing, reports the parameter counts of the official tiny,
    small and base models too.
"""
from __future__ import annotations


import numpy as np

from experiments.golden import common

REPOSITORY = "ruitian12/resformer"
FILE = "image_classification/models.py"
MODEL = "resformer_tiny_patch16"

REDUCED = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=10)
REDUCED_SIZES = (32, 56)
FULL_SIZES = (224, 160, 128, 384)
OFFICIAL = ("resformer_tiny_patch16", "resformer_small_patch16", "resformer_base_patch16")


def images_at(size: int, seed: int) -> np.ndarray:
  """(2, 3, size, size) noise plus a per-image, per-channel offset, at float16 precision."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, size, size)) + rng.standard_normal((2, 3, 1, 1))
  return x.astype(np.float16).astype(np.float32)


def run(root: str, commit: str, *, full: bool, seed: int = 0, out_dir: str = common.GOLDEN) -> dict:
  torch, _ = common.import_torch_and_timm()
  official = common.load_module(f"{root}/{FILE}", "official_resformer")
  torch.manual_seed(seed)
  if full:
    model, ctor, sizes = official.resformer_tiny_patch16(), MODEL, FULL_SIZES
  else:
    model, ctor, sizes = official.ResFormer(**REDUCED), "ResFormer", REDUCED_SIZES
  model.eval()
  common.perturb(model, seed + 1)
  pairs = []
  for i, size in enumerate(sizes):
    images = images_at(size, seed + 2 + i)
    with torch.no_grad():
      logits = model(torch.from_numpy(images)).numpy()
    pairs.append((images.transpose(0, 2, 3, 1), logits))
  state = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in model.state_dict().items()}
  fixture = {f"state/{k}": v for k, v in state.items()}
  fixture.update(images=pairs[0][0].astype(np.float16), logits=pairs[0][1],
                 images_2=pairs[1][0].astype(np.float16), logits_2=pairs[1][1],
                 **common.metadata(commit=commit, repository=REPOSITORY, source_file=FILE,
                                   official=ctor, model=MODEL, overrides={}))
  diffs = common.logit_diffs(fixture, pairs)
  out = {"model": MODEL, "official": ctor, "full": full,
         "params": common.param_count(model),
         "sizes": list(sizes), "max_abs_logit": [float(np.abs(y).max()) for _, y in pairs],
         "max_abs_diff": diffs}
  return common.finish(out, fixture, f"{MODEL}.npz", full=full, official=official,
                       constructors={n: n for n in OFFICIAL}, out_dir=out_dir)


def main(argv=None):
  common.main(__doc__, REPOSITORY, [FILE], run, argv)


if __name__ == "__main__":
  main()
