"""Golden fixture for SOFT from the authors' code (fudan-zvg/SOFT, models/
softmax_free_vision_transformer.py, `kernel_method='torch'`; DESIGN.md, decision 12).

    python -m experiments.golden.soft --repo=/path/to/SOFT                          # reduced
    python -m experiments.golden.soft --git-dir=/path/to/SOFT.git --commit=d3febc3  # from git
    python -m experiments.golden.soft --repo=... --full [--float64]                 # full size

The official code is CUDA-bound even on its 'torch' path; this script runs it on the CPU by
patching a temporary copy at run time (device handling only, the math untouched; the checkout
is not modified and nothing of it is committed):
  * SOFT/kernel/subtraction.py imports the compiled extension `SOFT._C` (used only by the 'cuda'
    kernel): an empty module stands in for it; cv2, imported and unused, likewise;
  * `subtraction_gaussian_kernel_torch` builds its ones with `.cuda()`: `.to(<input>.device)`;
  * `newton_inverse_kernel` raises for CPU tensors and its autograd Function asserts CUDA: the
    CPU branch calls the same Function (`_NewtonInverseKernel`: `newton_inv` forward, the
    official backward) and the CUDA asserts are dropped.

It then builds the official model in this Python (torch, timm 1.0.x, einops), draws seeded
random weights perturbed away from their init (experiments/golden/make.py's `perturb`: every
parameter and BatchNorm statistic, values rounded to float16 precision), runs a fixed input in
eval mode, converts the state dict with `vitjax.convert.from_official`, and prints
max|logits_vitjax - logits_official| and max|d(sum w*logits)/d(images)| difference (the input
gradient runs through the official backward of the Newton-Schulz inverse).

  * reduced (default): widths 8/16/16/24, heads 2/2/2/3 (head widths 4, 8, 8, 8), depths
    1/1/2/1, 10 classes, a 64x96 input (grids 16x24 ... 2x3: 2x3 landmarks in every SOFT stage,
    the 56x56 ... 7x7 position tables resized to them). Writes tests/golden/soft_tiny.npz (the
    layout of make.py's fixtures: 'state/<key>', 'images', 'logits', commit, repository, file,
    constructor, 'overrides').
  * --full: soft_tiny at 224 px (batch 2); writes nothing, reports the parameter counts of the
    five official models too. --float64 runs both sides in float64 as well.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import types

import numpy as np

from experiments.golden import common

REPOSITORY = "fudan-zvg/SOFT"
FILE = "models/softmax_free_vision_transformer.py"
SOURCES = ("models/__init__.py", "models/softmax_free_vision_transformer.py",
           "models/softmax_free_transformer.py", "SOFT/kernel/__init__.py",
           "SOFT/kernel/inverse.py", "SOFT/kernel/subtraction.py")
PACKAGE = "official_soft_models"     # the copy of models/ is imported under this name

# (file, text, replacement, expected count): the device-only CPU patch (module docstring).
CPU_PATCH = (
    ("models/softmax_free_transformer.py", "torch.ones(k.shape[-2:]).cuda()",
     "torch.ones(k.shape[-2:]).to(q.device)", 1),
    ("models/softmax_free_transformer.py", "torch.ones(q.shape[-2:]).cuda()",
     "torch.ones(q.shape[-2:]).to(k.device)", 1),
    ("SOFT/kernel/inverse.py", "assert mat.dim() == 4 and mat.is_cuda",
     "assert mat.dim() == 4", 2),
    ("SOFT/kernel/inverse.py", "assert grad_output.is_cuda", "pass", 2),
    ("SOFT/kernel/inverse.py",
     "out = _NewtonInverseKernel.apply(input_mat, iter)\n    else:\n"
     "        raise NotImplementedError",
     "out = _NewtonInverseKernel.apply(input_mat, iter)\n    else:\n"
     "        out = _NewtonInverseKernel.apply(input_mat, iter)", 1),
)

REDUCED = dict(patch_size=4, embed_dims=[8, 16, 16, 24], num_heads=[2, 2, 2, 3],
               mlp_ratios=[8, 8, 4, 4], qkv_bias=True, depths=[1, 1, 2, 1],
               sr_ratios=[8, 4, 2, 1], num_classes=10)
REDUCED_INPUT = (2, 3, 64, 96)
# create_model fields the weights do not show (the last stage's heads).
REDUCED_OVERRIDES = dict(num_heads=[2, 2, 2, 3])
OFFICIAL = ("soft_tiny", "soft_small", "soft_medium", "soft_large", "soft_huge")


def import_official(sources: dict, tmp: str):
  """torch and the CPU-patched official model module, imported from a copy under `tmp`."""
  torch, _ = common.import_torch_and_timm()
  sources = dict(sources)
  for path, old, new, count in CPU_PATCH:
    found = sources[path].count(old)
    if found != count:
      raise RuntimeError(f"CPU patch: {path} has {found} copies of {old!r}, expected {count}; "
                         "the official code changed, check the patch by hand")
    sources[path] = sources[path].replace(old, new)
  for path, text in sources.items():
    dest = os.path.join(tmp, path.replace("models/", PACKAGE + "/", 1))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
      f.write(text)
  sys.modules.setdefault("cv2", types.ModuleType("cv2"))            # imported, unused
  sys.modules.setdefault("SOFT._C", types.ModuleType("SOFT._C"))    # the CUDA extension
  sys.path.insert(0, tmp)
  return torch, importlib.import_module(f"{PACKAGE}.softmax_free_vision_transformer")


def build(official, torch, name: str | None):
  """The official model: constructor `name` (full size) or the reduced one."""
  if name:
    return getattr(official, name)(kernel_method="torch")
  return official.SoftmaxFreeVisionTransformer(
      norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), kernel_method="torch", **REDUCED)


def vitjax_logits_and_grad(fixture: dict, weights, *, float64: bool):
  """vitjax's logits and d(sum weights * logits)/d(images) (NHWC) after `from_official`."""
  import jax  # pylint: disable=g-import-not-at-top
  model, variables = common.from_fixture(fixture)
  dtype = np.float64 if float64 else np.float32
  variables = jax.tree.map(lambda x: np.asarray(x, dtype), variables)
  images = fixture["images"].astype(dtype)
  logits = jax.jit(model.apply)(variables, images)     # variables as arguments: no constant folding
  grad = jax.jit(jax.grad(lambda v, x: (model.apply(v, x) * weights).sum(), argnums=1))(
      variables, images)
  return np.asarray(logits), np.asarray(grad)


def run(sources: dict, commit: str, *, full: bool, float64: bool, seed: int = 0,
        out_dir: str = common.GOLDEN) -> dict:
  if float64:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_x64", True)
  with tempfile.TemporaryDirectory() as tmp:
    torch, official = import_official(sources, tmp)
    torch.manual_seed(seed)
    model = build(official, torch, "soft_tiny" if full else None).eval()
    common.perturb(model, seed + 1)
    shape = (2, 3, 224, 224) if full else REDUCED_INPUT
    images = np.random.default_rng(seed + 2).standard_normal(shape).astype(np.float16)
    weights = np.random.default_rng(seed + 3).standard_normal((2, model.num_classes))
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    out = {"model": "soft_tiny", "full": full, "input": list(shape), "commit": commit,
           "params": common.param_count(model)}
    official_counts = {n: common.param_count(build(official, torch, n))
                       for n in OFFICIAL} if full else None
    fixture = {f"state/{k}": v.astype(np.float16) if v.dtype == np.float32 else v
               for k, v in state.items()}
    fixture.update(images=images.transpose(0, 2, 3, 1),
                   **common.metadata(commit=commit, repository=REPOSITORY, source_file=FILE,
                                     official="soft_tiny" if full else
                                     "SoftmaxFreeVisionTransformer", model="soft_tiny",
                                     overrides={} if full else REDUCED_OVERRIDES))
    for dtype in ("float32", "float64") if float64 else ("float32",):
      tdtype = getattr(torch, dtype)
      torch.set_default_dtype(tdtype)      # the official code builds its ones / eye in it
      m = model.to(tdtype)
      x = torch.from_numpy(images.astype(dtype)).requires_grad_(True)
      logits = m(x)
      (logits * torch.from_numpy(weights.astype(dtype))).sum().backward()
      logits, grad = logits.detach().numpy(), x.grad.numpy().transpose(0, 2, 3, 1)
      if dtype == "float32":
        fixture["logits"] = logits
      ours, our_grad = vitjax_logits_and_grad(fixture, weights.astype(dtype),
                                              float64=dtype == "float64")
      out[dtype] = {"max_abs_logit": float(np.abs(logits).max()),
                    "max_abs_diff": float(np.abs(ours - logits).max()),
                    "max_abs_input_grad": float(np.abs(grad).max()),
                    "max_abs_input_grad_diff": float(np.abs(our_grad - grad).max())}
  if full:
    out["official_params"] = official_counts
  else:
    common.save(fixture, "soft_tiny.npz", out, out_dir)
  print(json.dumps(out))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_source_flags(parser, REPOSITORY)
  parser.add_argument("--float64", action="store_true", help="also compare in float64")
  args = parser.parse_args(argv)
  sources, commit = common.read_sources(args, SOURCES)
  run(sources, commit, full=args.full, float64=args.float64, out_dir=args.out)


if __name__ == "__main__":
  main()
