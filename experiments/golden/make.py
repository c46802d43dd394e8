"""Golden fixtures from the authors' own code (DESIGN.md, decision 12).

    git clone <mirror of raoyongming/HorNet> /tmp/official/HorNet      # any checkout of the repo
    python -m experiments.golden.make hornet --repo=/tmp/official/HorNet            # reduced: writes
    python -m experiments.golden.make hornet --repo=/tmp/official/HorNet --full     # full size: reports

Subcommands (one per official repository): hornet, spectformer, cvt, rmt. For each model of the
repository the script builds the official PyTorch model, draws seeded random weights perturbed away
from their init (every parameter, layer-scale gammas and BatchNorm weights, biases and running
statistics included; derived buffers such as RMT's decay tables stay as the code computes them),
runs a fixed input through it in eval mode, and

  * reduced (default): writes tests/golden/<vitjax model>.npz with the state dict ('state/<key>'),
    the input ('images', NHWC float32), the logits, the official commit id, repository, file and
    constructor, and the create_model overrides the weights do not show ('overrides', JSON);
  * --full: builds the full-size model (224 px, batch 2), writes nothing, reports its parameter count.

Either way it converts the state dict with `vitjax.convert.from_official` and prints max|diff| of
the logits against vitjax's. Needs torch, timm and einops (the official code's imports); the import
shims some repositories need (torch._six for CvT, numpy.lib.arraypad for SpectFormer, fvcore for RMT)
live here, never in the library. The tests (tests/test_official.py) read the fixtures without torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types
from typing import Any, Callable, NamedTuple

import numpy as np

from experiments.golden import common
from experiments.golden.common import GOLDEN, import_torch_and_timm, load_module, perturb


class Case(NamedTuple):
  """One official model to record: `build()` returns the torch module."""
  model: str                        # vitjax model name (also the fixture's name)
  official: str                     # official constructor, as in the repository
  build: Callable[[], Any]
  input_shape: tuple[int, ...]      # NCHW, as the official code takes it
  overrides: dict                   # create_model fields the weights do not show


# ---------------------------------------------------------------------------------------------
# Recording one case (the shared machinery is experiments/golden/common.py).

def commit_of(repo: str) -> str:
  return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()


def run_case(case: Case, *, repo: str, file: str, full: bool, seed: int = 0,
             out_dir: str = GOLDEN) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = case.build().eval()
  perturb(model, seed + 1)
  images = np.random.default_rng(seed + 2).standard_normal(case.input_shape).astype(np.float16)
  images = images.astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  count = common.param_count(model)
  # Parameters and BatchNorm statistics hold float16 values (see `perturb`); derived buffers keep
  # float32.
  half = {n for n, _ in model.named_parameters()} | {
      n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
  fixture = {f"state/{k}": v.astype(np.float16) if k in half else v for k, v in state.items()}
  fixture.update(images=images.transpose(0, 2, 3, 1).astype(np.float16), logits=logits,
                 **common.metadata(commit=commit_of(repo), repository=REPOS[case_family(case)],
                                   source_file=file, official=case.official, model=case.model,
                                   overrides=case.overrides))
  diff = common.compare(fixture)
  out = {"model": case.model, "official": case.official, "params": count,
         "input": list(case.input_shape), "max_abs_logit": float(np.abs(logits).max()),
         "max_abs_diff": diff}
  if not full:
    common.save(fixture, f"{case.model}.npz", out, out_dir)
  print(json.dumps(out))
  return out


REPOS = {"hornet": "raoyongming/HorNet", "spectformer": "badripatro/SpectFormers",
         "cvt": "microsoft/CvT", "rmt": "qhfan/RMT"}


def case_family(case: Case) -> str:
  return case.model.split("_")[0]


# ---------------------------------------------------------------------------------------------
# The repositories.

def hornet_cases(repo: str, full: bool):
  """hornet_t (7x7) and hornet_t_gf. Reduced: base_dim 8, one block per stage, 64 px, 10 classes;
  the GF filters keep the official 14x8 / 7x4 size, so the reduced run also checks their
  bilinear resize to the 4x3 / 2x2 frequency grids."""
  import_torch_and_timm()
  hornet = load_module(os.path.join(repo, "hornet.py"), "official_hornet")
  cases = []
  for model, official in (("hornet_t", "hornet_tiny_7x7"), ("hornet_t_gf", "hornet_tiny_gf")):
    ctor = getattr(hornet, official)
    if full:
      cases.append(Case(model, official, ctor, (2, 3, 224, 224), {}))
    else:
      cases.append(Case(model, official, lambda c=ctor: _reduced_hornet(hornet, c),
                        (2, 3, 64, 64), {}))
  return cases, "hornet.py"


def _reduced_hornet(hornet, ctor):
  import functools  # pylint: disable=g-import-not-at-top
  full = ctor()   # to read its per-stage gnconv partials
  gnconvs = [blk.gnconv for blk in (stage[0] for stage in full.stages)]
  partials = []
  for g in gnconvs:
    kw = dict(order=g.order, s=g.scale)
    if isinstance(g.dwconv, hornet.GlobalLocalFilter):
      _, h, w, _ = g.dwconv.complex_weight.shape
      kw.update(h=h, w=w, gflayer=hornet.GlobalLocalFilter)
    partials.append(functools.partial(hornet.gnconv, **kw))
  return hornet.HorNet(depths=[1, 1, 1, 1], base_dim=8, num_classes=10, gnconv=partials)


def rmt_cases(repo: str, full: bool):
  """rmt_t from classfication_release (`RMT_T3`) and rmt_s from classification_token_label_release
  (token-labelling aux head). Reduced: widths 16-48, 1-2 blocks per stage, decay settings that
  differ per stage, a 64x96 input (a non-square grid), 10 classes; the reduced rmt_s also turns
  on layer scale in stages 3 and 4, as RMT-B and -L do."""
  import_torch_and_timm()
  fvcore = types.ModuleType("fvcore")                 # imported by RMT.py, used only in __main__
  fvcore.nn = types.ModuleType("fvcore.nn")
  fvcore.nn.FlopCountAnalysis = fvcore.nn.flop_count_table = None
  sys.modules.update({"fvcore": fvcore, "fvcore.nn": fvcore.nn})
  cls = load_module(os.path.join(repo, "classfication_release", "RMT.py"), "official_rmt_cls")
  tl = load_module(os.path.join(repo, "classification_token_label_release", "RMT.py"),
                   "official_rmt_tl")
  if full:
    return [Case("rmt_t", "RMT_T3", lambda: cls.RMT_T3(None), (2, 3, 224, 224), {}),
            Case("rmt_s", "RMT_S", lambda: tl.RMT_S(None), (2, 3, 224, 224), {}),
            Case("rmt_b", "RMT_M2", lambda: tl.RMT_M2(None), (2, 3, 224, 224), {}),
            Case("rmt_l", "RMT_L6", lambda: tl.RMT_L6(None), (2, 3, 224, 224), {})], \
        "classfication_release/RMT.py, classification_token_label_release/RMT.py"
  small = dict(embed_dims=[16, 24, 32, 48], depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4],
               init_values=[2, 3, 2, 1], heads_ranges=[4, 3, 6, 5], mlp_ratios=[2, 3, 2, 2],
               projection=64, num_classes=10, drop_path_rate=0.0)
  return [
      Case("rmt_t", "RMT_T3", lambda: cls.VisRetNet(
          **small, chunkwise_recurrents=[True, True, False, False]), (2, 3, 64, 96), {}),
      Case("rmt_s", "RMT_S", lambda: tl.VisRetNet(
          **small, chunkwise_recurrents=[True, True, True, False],
          layerscales=[False, False, True, True]), (2, 3, 64, 96), {}),
  ], "classfication_release/RMT.py (rmt_t), classification_token_label_release/RMT.py (rmt_s)"


def spectformer_cases(repo: str, full: bool):
  """spectformer_s (vanilla, `spectformer-s` of main_spectformer.py). Reduced: width 48 (the
  official attention block hard-codes 6 heads), depth 5 (the official alpha = 4 spectral blocks,
  then one attention block), MLP ratio 2, patch 8, 32 px, 10 classes."""
  import functools  # pylint: disable=g-import-not-at-top
  import_torch_and_timm()
  import torch  # pylint: disable=g-import-not-at-top
  arraypad = types.ModuleType("numpy.lib.arraypad")    # gone from numpy 2; imported, unused
  arraypad.pad = np.pad
  sys.modules["numpy.lib.arraypad"] = arraypad
  sf = load_module(os.path.join(repo, "vanilla_architecture", "spectformer.py"),
                   "official_spectformer")
  norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
  if full:
    build = lambda: sf.SpectFormer(img_size=224, patch_size=16, embed_dim=384, depth=19,  # noqa: E731
                                   mlp_ratio=4, norm_layer=norm)
    return [Case("spectformer_s", "spectformer-s", build, (2, 3, 224, 224), {})], \
        "vanilla_architecture/spectformer.py"
  build = lambda: sf.SpectFormer(img_size=32, patch_size=8, embed_dim=48, depth=5,  # noqa: E731
                                 mlp_ratio=2, num_classes=10, norm_layer=norm)
  return [Case("spectformer_s", "spectformer-s", build, (2, 3, 32, 32), {})], \
      "vanilla_architecture/spectformer.py"


def cvt_cases(repo: str, full: bool):
  """cvt_13 with the official QuickGELU (the SPEC of experiments/imagenet/cvt/cvt-13-224x224.yaml).
  Reduced: widths 16/32/48, heads 1/2/3, depths 1/1/2, 64 px, 10 classes. Batch 2: the official
  `forward_features` squeezes the batch axis away when B = 1."""
  import collections.abc  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import_torch_and_timm()
  six = types.ModuleType("torch._six")                 # removed from torch; cls_cvt imports it
  six.container_abcs = collections.abc
  sys.modules["torch._six"] = six
  package = types.ModuleType("official_cvt")
  package.__path__ = [os.path.join(repo, "lib", "models")]
  sys.modules["official_cvt"] = package
  cvt = importlib.import_module("official_cvt.cls_cvt")
  spec = dict(INIT="trunc_norm", NUM_STAGES=3, PATCH_SIZE=[7, 3, 3], PATCH_STRIDE=[4, 2, 2],
              PATCH_PADDING=[2, 1, 1], DIM_EMBED=[64, 192, 384], NUM_HEADS=[1, 3, 6],
              DEPTH=[1, 2, 10], MLP_RATIO=[4.0] * 3, ATTN_DROP_RATE=[0.0] * 3,
              DROP_RATE=[0.0] * 3, DROP_PATH_RATE=[0.0, 0.0, 0.1], QKV_BIAS=[True] * 3,
              CLS_TOKEN=[False, False, True], POS_EMBED=[False] * 3,
              QKV_PROJ_METHOD=["dw_bn"] * 3, KERNEL_QKV=[3] * 3, PADDING_KV=[1] * 3,
              STRIDE_KV=[2] * 3, PADDING_Q=[1] * 3, STRIDE_Q=[1] * 3)
  num_classes, shape, overrides = 1000, (2, 3, 224, 224), {}
  if not full:
    spec.update(DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 2])
    num_classes, shape, overrides = 10, (2, 3, 64, 64), {"num_heads": [1, 2, 3]}
  build = lambda: cvt.ConvolutionalVisionTransformer(  # noqa: E731
      in_chans=3, num_classes=num_classes, act_layer=cvt.QuickGELU,
      norm_layer=functools.partial(cvt.LayerNorm, eps=1e-5), init="trunc_norm", spec=spec)
  return [Case("cvt_13", "cvt-13-224x224", build, shape, overrides)], "lib/models/cls_cvt.py"


FAMILIES = {"hornet": hornet_cases, "spectformer": spectformer_cases, "cvt": cvt_cases,
            "rmt": rmt_cases}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("family", choices=sorted(FAMILIES))
  parser.add_argument("--repo", required=True, help="a checkout of the official repository")
  parser.add_argument("--full", action="store_true", help="full-size comparison; writes nothing")
  parser.add_argument("--only", default=None, help="comma-separated vitjax model names")
  parser.add_argument("--out", default=GOLDEN, help="where the reduced fixtures go")
  args = parser.parse_args(argv)
  cases, file = FAMILIES[args.family](os.path.abspath(args.repo), args.full)
  only = None if args.only is None else set(args.only.split(","))
  for case in cases:
    if only is None or case.model in only:
      run_case(case, repo=args.repo, file=file, full=args.full, out_dir=args.out)


if __name__ == "__main__":
  main()
