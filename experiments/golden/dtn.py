"""Golden fixture for DTN from the authors' code (wqshao126/DTN; DESIGN.md, decision 12).

    python -m experiments.golden.dtn --repo=/path/to/DTN            # reduced: writes the fixture
    python -m experiments.golden.dtn --git-dir=/path/to/repo.git --commit=f6b4337  # from git
    python -m experiments.golden.dtn --repo=/path/to/DTN --full     # full size: writes nothing

Imports the official package `models` of the checkout (models/vit_norm_mix.py, whose
`VisionTransformer` with norm_type='dtn' builds `DTN` of models/normkit/norms/dtn.py; its
imports need torch, timm 1.0.x through the tests' torchvision shim, einops and matplotlib),
draws seeded random weights pushed away from their init (every parameter: norm weights and
biases N(0, 0.2) noise, DTN's mixing weights `mean_norm_weight` / `var_norm_weight` N(0, 1.5)
so that lambda ranges over (0, 1), other tensors noise of std max(0.5 std, 0.5 / sqrt(fan_in));
every value rounded to float16 precision), runs a fixed input in eval mode, converts the state
dict with `vitjax.convert.from_official` and prints max|logits_vitjax - logits_official|.

  * reduced (default): `VisionTransformer` at 56 px with patch 4 (the 14 x 14 grid the official
    'dtn' layer is built for), width 16, 4 heads, depth 3 with the class token joining before
    block 2 (local_up_to_layer=2), MLP ratio 2, 10 classes. The fixture also holds one pooled
    layer, the official `DTN(8, group_num=2, resolution=(28, 28))` ('dtn_pool': statistics on
    the 2x2-pooled 14 x 14 grid), its perturbed weights ('pool/state/<key>'), input
    ('pool/input', (2, 784, 8)) and output ('pool/output'). Writes
    tests/golden/dtn_vit_ti16_star.npz in the layout of experiments/golden/make.py's fixtures.
  * --full: `vit_norm_ti_star(norm_type='dtn')` at 224 px (batch 2), 5,710,792 parameters.
"""
from __future__ import annotations

import importlib
import json
import sys

import numpy as np

from experiments.golden import common

REPOSITORY = "wqshao126/DTN"
FILE = "models/vit_norm_mix.py, models/normkit/norms/dtn.py"
MODEL = "vit_ti16_star_dtn"
FIXTURE = "dtn_vit_ti16_star.npz"
# The package `models` of the repository (what a --git-dir run copies out).
FILES = tuple(f"models/{f}.py" for f in (
    "__init__", "pvt_norm", "vit_norm", "vit_norm_mix", "normkit/norm_select", "normkit/norms/dtn",
    "normkit/norms/us_groupnorm", "normkit/norms/us_instancenorm", "normkit/norms/us_layernorm",
    "normkit/norms/us_powernorm", "normkit/norms/us_scalenorm"))

REDUCED = dict(img_size=56, patch_size=4, embed_dim=16, depth=3, num_heads=4, mlp_ratio=2.0,
               num_classes=10, local_up_to_layer=2, norm_type="dtn")
POOL_LAYER = dict(num_features=8, group_num=2, resolution=(28, 28))


def import_official(repo: str):
  """torch and the official package `models` (timm through the tests' torchvision shim)."""
  torch, _ = common.import_torch_and_timm()
  sys.path.insert(0, repo)
  return torch, importlib.import_module("models.vit_norm_mix"), importlib.import_module(
      "models.normkit.norms.dtn")


def perturb(module, seed: int):
  """common.perturb, with DTN's mixing logits (`mean_norm_weight`, `var_norm_weight`, 0 at init)
  drawn from N(0, 1.5) so that lambda ranges over (0, 1)."""
  common.perturb(module, seed,
                 rule=lambda name, p, noise, gen: 1.5 * noise if name.endswith("norm_weight")
                 else None)


def _state(module) -> dict:
  return {k: v.detach().cpu().numpy().astype(np.float16) for k, v in module.state_dict().items()}


def compare(fixture: dict) -> dict:
  """max|vitjax - official| of the logits after `from_official` and, when the fixture has one,
  of the pooled layer (what tests/test_dtn.py and tests/test_official.py check)."""
  from vitjax.convert.official import dtn as dtn_convert  # pylint: disable=g-import-not-at-top
  from vitjax.models.backbone import Tokens  # pylint: disable=g-import-not-at-top
  out = {"max_abs_diff": common.compare(fixture)}
  if "pool/input" in fixture:
    layer_state = {k[len("pool/state/"):]: v for k, v in fixture.items()
                   if k.startswith("pool/state/")}
    layer, layer_vars = dtn_convert.layer_from_official(layer_state)
    x = fixture["pool/input"].astype(np.float32)
    grid = tuple(int(g) for g in fixture["pool/grid"])
    y = layer.apply(layer_vars, x, tokens=Tokens(x, grid=grid))
    out["pool_max_abs_diff"] = float(np.abs(np.asarray(y) - fixture["pool/output"]).max())
  return out


def run(repo: str, commit: str, *, full: bool, seed: int = 0, out_dir: str = common.GOLDEN) -> dict:
  torch, official, norms = import_official(repo)
  torch.manual_seed(seed)
  if full:
    model, size = official.vit_norm_ti_star(norm_type="dtn"), 224
  else:
    model, size = official.VisionTransformer(**REDUCED), REDUCED["img_size"]
  model.eval()
  perturb(model, seed + 1)
  rng = np.random.default_rng(seed + 2)
  images = rng.standard_normal((2, 3, size, size)).astype(np.float16).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
  fixture = {f"state/{k}": v for k, v in _state(model).items()}
  fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                 **common.metadata(commit=commit, repository=REPOSITORY, source_file=FILE,
                                   official="vit_norm_ti_star" if full else "VisionTransformer",
                                   model=MODEL, overrides={}))
  if not full:
    layer = norms.DTN(**POOL_LAYER).eval()
    perturb(layer, seed + 3)
    h, w = POOL_LAYER["resolution"]
    x = rng.standard_normal((2, h * w, POOL_LAYER["num_features"])).astype(np.float16)
    with torch.no_grad():
      y = layer(torch.from_numpy(x.astype(np.float32))).numpy()
    fixture.update({f"pool/state/{k}": v for k, v in _state(layer).items()})
    fixture.update({"pool/input": x, "pool/output": y, "pool/grid": np.array([h, w])})
  out = {"model": MODEL, "full": full, "input": [2, 3, size, size],
         "params": common.param_count(model),
         "max_abs_logit": float(np.abs(logits).max()), **compare(fixture)}
  if not full:
    common.save(fixture, FIXTURE, out, out_dir)
  print(json.dumps(out))
  return out


def main(argv=None):
  common.main(__doc__, REPOSITORY, FILES, run, argv)


if __name__ == "__main__":
  main()
