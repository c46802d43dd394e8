"""Golden fixture for SReT from the authors' code (szq0214/SReT, SReT.py; DESIGN.md, decision 12).

    python -m experiments.golden.sret --repo=/path/to/SReT                        # reduced
    python -m experiments.golden.sret --git-dir=/path/to/repo.git --commit=af6db0a  # from git
    python -m experiments.golden.sret --repo=... --full                          # full size

Builds the official `SReT` in this Python (torch, timm 1.0.x and einops, the imports of the
official file), draws seeded random weights perturbed away from their init with
`experiments.golden.make.perturb` (every parameter, the learnable residual coefficients and the
BatchNorm statistics included; every value rounded to float16 precision), runs a fixed input in
eval mode, converts the state dict with `vitjax.convert.from_official` and prints
max|logits_vitjax - logits_official|.

The permutation. The official `Group_Attention` draws `torch.randperm(N)` from torch's global
generator on every recursive pass with groups2 > 1, at eval too, so its eval logits are random.
While the official model runs, this script makes `torch.randperm` return vitjax's fixed eval
permutation (`vitjax.ops.sliced.fixed_permutation(N)`), which is what vitjax uses at eval
without a 'permute' rng: both models then group the same tokens. It counts those calls (the
output's 'permuted_passes') so a fixture that never permuted cannot pass unnoticed.

  * reduced (default): 64 px, dims 8/16/32 (heads 2/4/8), depths 2/4/2 (one, two and one shared
    blocks), groups1 8/4/1 and groups2 2/2/1 (stages 1 and 2 permute: 64 and 16 tokens),
    mlp_ratio 3.6 (hidden 28/57/115: the ratio is read back from all three), np_mlp_ratio 2,
    10 classes. Writes tests/golden/sret_t.npz: the state dict ('state/<key>', both copies of
    each shared block as `state_dict()` has them), the input ('images', NHWC), the logits, the
    official commit id, repository, file and constructor, and the create_model overrides the
    weights do not show ('overrides', JSON), the layout of experiments/golden/make.py's fixtures.
  * --full: SReT_T at 224 px (batch 2); writes nothing, reports the parameter counts of the
    official SReT_T, SReT_LT and SReT_S too.
"""
from __future__ import annotations

import contextlib

import numpy as np

from experiments.golden import common

REPOSITORY = "szq0214/SReT"
FILE = "SReT.py"

REDUCED = dict(image_size=64, patch_size=16, stride=8, base_dims=[4, 4, 4], depth=[2, 4, 2],
               recursive_num=[1, 2, 1], heads=[2, 4, 8], groups1=[8, 4, 1], groups2=[2, 2, 1],
               mlp_ratio=3.6, np_mlp_ratio=2, num_classes=10)
# create_model fields the weights do not show (the rest is read off the state dict).
REDUCED_OVERRIDES = dict(num_heads=[2, 4, 8], groups1=[8, 4, 1], groups2=[2, 2, 1])
OFFICIAL = {"sret_t": "SReT_T", "sret_lt": "SReT_LT", "sret_s": "SReT_S"}


@contextlib.contextmanager
def fixed_randperm(torch, calls: list):
  """`torch.randperm(n)` returns vitjax's fixed eval permutation of n while inside (module doc)."""
  from vitjax.ops import sliced  # pylint: disable=g-import-not-at-top
  original = torch.randperm

  def randperm(n, *args, **kwargs):
    calls.append(int(n))
    return torch.from_numpy(sliced.fixed_permutation(int(n)).astype(np.int64))

  torch.randperm = randperm
  try:
    yield
  finally:
    torch.randperm = original


def run(root: str, commit: str, *, full: bool, seed: int = 0, out_dir: str = common.GOLDEN) -> dict:
  torch, _ = common.import_torch_and_timm()
  official = common.load_module(f"{root}/{FILE}", "official_sret")
  torch.manual_seed(seed)
  if full:
    model, size, overrides, ctor = official.SReT_T(), 224, {}, "SReT_T"
  else:
    model, size, overrides, ctor = (official.SReT(**REDUCED), REDUCED["image_size"],
                                    dict(REDUCED_OVERRIDES), "SReT")
  model.eval()
  common.perturb(model, seed + 1)
  # Noise plus a per-image, per-channel offset: two noise images alone look alike after the
  # global average pooling before the head.
  rng = np.random.default_rng(seed + 2)
  images = rng.standard_normal((2, 3, size, size)) + rng.standard_normal((2, 3, 1, 1))
  images = images.astype(np.float16).astype(np.float32)
  calls: list[int] = []
  with torch.no_grad(), fixed_randperm(torch, calls):
    logits = model(torch.from_numpy(images)).numpy()
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  fixture = {f"state/{k}": v if k.endswith("num_batches_tracked") else v.astype(np.float16)
             for k, v in state.items()}
  fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                 **common.metadata(commit=commit, repository=REPOSITORY, source_file=FILE,
                                   official=ctor, model="sret_t", overrides=overrides))
  out = {"model": "sret_t", "official": ctor, "full": full, "input": [2, 3, size, size],
         "params": common.param_count(model),
         "permuted_passes": calls, "max_abs_logit": float(np.abs(logits).max()),
         "max_abs_diff": common.compare(fixture)}
  if not calls:
    raise RuntimeError("the official model drew no permutation; the fixture would not test it")
  return common.finish(out, fixture, "sret_t.npz", full=full, official=official,
                       constructors=OFFICIAL, out_dir=out_dir)


def main(argv=None):
  common.main(__doc__, REPOSITORY, [FILE], run, argv)


if __name__ == "__main__":
  main()
