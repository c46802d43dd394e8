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

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(ROOT, "tests", "golden")
REPOSITORY = "ruitian12/resformer"
FILE = "image_classification/models.py"
MODEL = "resformer_tiny_patch16"

REDUCED = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=10)
REDUCED_SIZES = (32, 56)
FULL_SIZES = (224, 160, 128, 384)
OFFICIAL = ("resformer_tiny_patch16", "resformer_small_patch16", "resformer_base_patch16")


def import_official(path: str):
  """torch and the official module (timm through the tests' torchvision shim)."""
  sys.path.insert(0, ROOT)
  from experiments.golden import make  # pylint: disable=g-import-not-at-top
  torch, _ = make.import_torch_and_timm()
  return torch, make.load_module(path, "official_resformer")


def images_at(size: int, seed: int) -> np.ndarray:
  """(2, 3, size, size) noise plus a per-image, per-channel offset, at float16 precision."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, size, size)) + rng.standard_normal((2, 3, 1, 1))
  return x.astype(np.float16).astype(np.float32)


def convert(fixture: dict):
  """The vitjax model and variables of a fixture's state dict (`from_official`)."""
  from vitjax import convert as vconvert  # pylint: disable=g-import-not-at-top
  state = {k[len("state/"):]: v for k, v in fixture.items() if k.startswith("state/")}
  return vconvert.from_official(state, str(fixture["model"]),
                                **json.loads(str(fixture["overrides"])))[:2]


def compare(fixture: dict, pairs) -> list[float]:
  """max|logits_vitjax - logits_official| for each (images NHWC, logits) pair."""
  import jax  # pylint: disable=g-import-not-at-top
  model, variables = convert(fixture)
  apply = jax.jit(model.apply)
  return [float(np.abs(np.asarray(apply(variables, x.astype(np.float32))) - y).max())
          for x, y in pairs]


def run(path: str, commit: str, *, full: bool, seed: int = 0) -> dict:
  torch, official = import_official(path)
  from experiments.golden import make  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if full:
    model, ctor, sizes = official.resformer_tiny_patch16(), MODEL, FULL_SIZES
  else:
    model, ctor, sizes = official.ResFormer(**REDUCED), "ResFormer", REDUCED_SIZES
  model.eval()
  make.perturb(model, seed + 1)
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
                 commit=np.array(commit), repository=np.array(REPOSITORY),
                 source_file=np.array(FILE), official=np.array(ctor), model=np.array(MODEL),
                 overrides=np.array(json.dumps({})))
  diffs = compare(fixture, pairs)
  out = {"model": MODEL, "official": ctor, "full": full,
         "params": sum(p.numel() for p in model.parameters()),
         "sizes": list(sizes), "max_abs_logit": [float(np.abs(y).max()) for _, y in pairs],
         "max_abs_diff": diffs}
  if full:
    out["official_params"] = {n: sum(p.numel() for p in getattr(official, n)().parameters())
                              for n in OFFICIAL}
  else:
    os.makedirs(GOLDEN, exist_ok=True)
    path = os.path.join(GOLDEN, f"{MODEL}.npz")
    np.savez_compressed(path, **fixture)
    out.update(fixture=os.path.relpath(path, ROOT), bytes=os.path.getsize(path))
  print(json.dumps(out))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repo", help="a checkout of ruitian12/resformer")
  parser.add_argument("--git-dir", help="its git directory (bare or not), read with git show")
  parser.add_argument("--commit", default="HEAD", help="with --git-dir: the commit to read")
  parser.add_argument("--full", action="store_true", help="full-size comparison; writes nothing")
  args = parser.parse_args(argv)
  if bool(args.repo) == bool(args.git_dir):
    parser.error("give exactly one of --repo and --git-dir")
  git = ["git", "-C", args.repo] if args.repo else ["git", f"--git-dir={args.git_dir}"]
  rev = args.commit if args.git_dir else "HEAD"
  commit = subprocess.run(git + ["rev-parse", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
  if args.repo:
    run(os.path.join(args.repo, FILE), commit, full=args.full)
    return
  source = subprocess.run(git + ["show", f"{commit}:{FILE}"], check=True, capture_output=True,
                          text=True).stdout
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "models.py")
    with open(path, "w") as f:
      f.write(source)
    run(path, commit, full=args.full)


if __name__ == "__main__":
  main()
