"""Golden fixture for CSWin from the authors' code (microsoft/CSWin-Transformer, models/cswin.py;
DESIGN.md, decision 12).

    python -m experiments.golden.cswin --repo=/path/to/CSWin-Transformer            # reduced
    python -m experiments.golden.cswin --git-dir=/path/to/repo.git --commit=f111ae2  # from git
    python -m experiments.golden.cswin --repo=... --full                            # full size

Builds the official `CSWinTransformer` in this Python (torch, timm 1.0.x and einops, the imports
of the official file), draws seeded random weights perturbed away from their init (every
parameter: norm weights and biases get N(0, 0.2) noise, other tensors noise of std
max(0.5 std, 0.5 / sqrt(fan_in)); every value rounded to float16 precision so the fixture stores
half the bytes), runs a fixed input in eval mode, converts the state dict with
`vitjax.convert.from_official` and prints max|logits_vitjax - logits_official|.

  * reduced (default): 64 px, embed_dim 8, depths [1, 1, 2, 1], split_size [1, 2, 2, 2], heads
    [2, 2, 4, 4], 10 classes (the stage grids are 16, 8, 4, 2, so every stripe tiles and stage 3
    has two branches of two stripes each). Writes tests/golden/cswin_tiny_224.npz: the state
    dict ('state/<key>'), the input ('images', NHWC), the logits, the official commit id,
    repository, file and constructor, and the create_model overrides the weights do not show
    ('overrides', JSON), the layout of experiments/golden/make.py's fixtures.
  * --full: CSWin_64_12211_tiny_224 at 224 px (batch 2); writes nothing, reports the parameter
    counts of the official tiny, small and base models too.
"""
from __future__ import annotations


import numpy as np

from experiments.golden import common

REPOSITORY = "microsoft/CSWin-Transformer"
FILE = "models/cswin.py"

REDUCED = dict(img_size=64, embed_dim=8, depth=[1, 1, 2, 1], split_size=[1, 2, 2, 2],
               num_heads=[2, 2, 4, 4], num_classes=10)
# create_model fields the weights do not show (the rest is read off the state dict).
REDUCED_OVERRIDES = dict(num_heads=[2, 2, 4, 4], split_size=[1, 2, 2, 2])
OFFICIAL = {"cswin_tiny_224": "CSWin_64_12211_tiny_224",
            "cswin_small_224": "CSWin_64_24322_small_224",
            "cswin_base_224": "CSWin_96_24322_base_224"}


def run(root: str, commit: str, *, full: bool, seed: int = 0, out_dir: str = common.GOLDEN) -> dict:
  torch, _ = common.import_torch_and_timm()
  official = common.load_module(f"{root}/{FILE}", "official_cswin")
  torch.manual_seed(seed)
  if full:
    model, size, overrides = official.CSWin_64_12211_tiny_224(), 224, {}
  else:
    model, size, overrides = official.CSWinTransformer(**REDUCED), REDUCED["img_size"], dict(
        REDUCED_OVERRIDES)
  model.eval()
  common.perturb(model, seed + 1)
  images = np.random.default_rng(seed + 2).standard_normal((2, 3, size, size))
  images = images.astype(np.float16).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
  state = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in model.state_dict().items()}
  fixture = {f"state/{k}": v for k, v in state.items()}
  fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                 **common.metadata(commit=commit, repository=REPOSITORY, source_file=FILE,
                                   official="CSWin_64_12211_tiny_224" if full else
                                   "CSWinTransformer", model="cswin_tiny_224",
                                   overrides=overrides))
  out = {"model": "cswin_tiny_224", "full": full, "input": [2, 3, size, size],
         "params": common.param_count(model),
         "max_abs_logit": float(np.abs(logits).max()), "max_abs_diff": common.compare(fixture)}
  return common.finish(out, fixture, "cswin_tiny_224.npz", full=full, official=official,
                       constructors=OFFICIAL, out_dir=out_dir)


def main(argv=None):
  common.main(__doc__, REPOSITORY, [FILE], run, argv)


if __name__ == "__main__":
  main()
