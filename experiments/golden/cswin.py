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

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(ROOT, "tests", "golden")
REPOSITORY = "microsoft/CSWin-Transformer"
FILE = "models/cswin.py"

REDUCED = dict(img_size=64, embed_dim=8, depth=[1, 1, 2, 1], split_size=[1, 2, 2, 2],
               num_heads=[2, 2, 4, 4], num_classes=10)
# create_model fields the weights do not show (the rest is read off the state dict).
REDUCED_OVERRIDES = dict(num_heads=[2, 2, 4, 4], split_size=[1, 2, 2, 2])
OFFICIAL = {"cswin_tiny_224": "CSWin_64_12211_tiny_224",
            "cswin_small_224": "CSWin_64_24322_small_224",
            "cswin_base_224": "CSWin_96_24322_base_224"}


def import_official(path: str):
  """torch and the official module (timm needs the tests' torchvision shim on a CPU torch)."""
  sys.path.insert(0, ROOT)
  from tests import torch_compat  # pylint: disable=g-import-not-at-top
  torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("official_cswin", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["official_cswin"] = module        # timm's register_model looks the module up
  spec.loader.exec_module(module)
  return torch, module


def perturb(torch, model, seed: int):
  """Seeded values for every parameter, away from the init, rounded to float16 precision."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.numel() == 1 or float(p.std()) < 1e-6:        # norm weights, biases
        p.add_(0.2 * noise)
      else:
        fan_in = p.numel() // p.shape[0]
        p.add_(max(0.5 * float(p.std()), 0.5 / fan_in ** 0.5) * noise)
      p.copy_(p.half().float())


def compare(fixture: dict) -> float:
  """max|logits_vitjax - logits_official| after `from_official` (what tests/test_cswin.py does)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitjax import convert  # pylint: disable=g-import-not-at-top
  state = {k[len("state/"):]: v for k, v in fixture.items() if k.startswith("state/")}
  model, variables, _ = convert.from_official(state, str(fixture["model"]),
                                              **json.loads(str(fixture["overrides"])))
  logits = jax.jit(model.apply)(variables, fixture["images"].astype(np.float32))
  return float(np.abs(np.asarray(logits) - fixture["logits"]).max())


def run(path: str, commit: str, *, full: bool, seed: int = 0) -> dict:
  torch, official = import_official(path)
  torch.manual_seed(seed)
  if full:
    model, size, overrides = official.CSWin_64_12211_tiny_224(), 224, {}
  else:
    model, size, overrides = official.CSWinTransformer(**REDUCED), REDUCED["img_size"], dict(
        REDUCED_OVERRIDES)
  model.eval()
  perturb(torch, model, seed + 1)
  images = np.random.default_rng(seed + 2).standard_normal((2, 3, size, size))
  images = images.astype(np.float16).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
  state = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in model.state_dict().items()}
  fixture = {f"state/{k}": v for k, v in state.items()}
  fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                 commit=np.array(commit), repository=np.array(REPOSITORY),
                 source_file=np.array(FILE),
                 official=np.array("CSWin_64_12211_tiny_224" if full else "CSWinTransformer"),
                 model=np.array("cswin_tiny_224"), overrides=np.array(json.dumps(overrides)))
  out = {"model": "cswin_tiny_224", "full": full, "input": [2, 3, size, size],
         "params": sum(p.numel() for p in model.parameters()),
         "max_abs_logit": float(np.abs(logits).max()), "max_abs_diff": compare(fixture)}
  if full:
    out["official_params"] = {name: sum(p.numel() for p in getattr(official, ctor)().parameters())
                              for name, ctor in OFFICIAL.items()}
  else:
    os.makedirs(GOLDEN, exist_ok=True)
    path = os.path.join(GOLDEN, "cswin_tiny_224.npz")
    np.savez_compressed(path, **fixture)
    out.update(fixture=os.path.relpath(path, ROOT), bytes=os.path.getsize(path))
  print(json.dumps(out))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repo", help="a checkout of microsoft/CSWin-Transformer")
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
    path = os.path.join(tmp, "cswin.py")
    with open(path, "w") as f:
      f.write(source)
    run(path, commit, full=args.full)


if __name__ == "__main__":
  main()
