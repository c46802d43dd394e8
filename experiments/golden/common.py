"""What every golden-fixture script shares (DESIGN.md, decision 12): reading the official code from
a checkout or a git directory, importing it next to torch and timm, perturbing its weights,
writing a fixture and comparing vitjax's logits with the recorded ones.

A script adds the source flags (`add_source_flags`: --repo or --git-dir [--commit], --full,
--out), opens the official files with `official_files(args, files)` (the checkout itself, or a
temporary copy of `files` at the commit) and writes `save(fixture, name, out, args.out)`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(ROOT, "tests", "golden")


def import_torch_and_timm():
  """torch and timm; on a CPU torch next to a CUDA torchvision wheel, timm needs the tests' shim."""
  sys.path.insert(0, ROOT)
  from tests import torch_compat  # pylint: disable=g-import-not-at-top
  timm = torch_compat.import_timm()
  import torch  # pylint: disable=g-import-not-at-top
  return torch, timm


def load_module(path: str, name: str):
  """Imports one official file as module `name` (its directory first on sys.path)."""
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module        # timm's register_model looks the module up
  spec.loader.exec_module(module)
  return module


# (name, parameter, its noise draw, the generator) -> the parameter's value, or None for the default.
Rule = Callable[[str, Any, Any, Any], Any]


def perturb(model, seed: int, rule: Rule | None = None):
  """Seeded random values for every parameter and BatchNorm statistic, away from the init.

  Layer-scale gammas (1e-6 at init) become U(0.5, 1); constant tensors (norm weights, biases)
  get N(0, 0.2) noise around their value; spectral filters ('complex_weight') become N(0, 0.5);
  other tensors get noise of std max(0.5 std, 0.5 / sqrt(fan_in)), so that activations stay
  O(1) through the net and every input shows in the logits. `rule(name, p, noise, gen)` may
  return a parameter's value first (e.g. DTN's mixing logits, zero at init). BatchNorm running
  means become N(0, 0.2), variances U(0.5, 1.5). Other buffers (derived tables) are left alone.
  Every value is then rounded to float16 precision (and kept float32), so the fixture stores it
  in half the bytes without changing what the official model computed.
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      leaf = name.rsplit(".", 1)[-1]
      value = rule(name, p, noise, gen) if rule else None
      if value is not None:
        p.copy_(value)
      elif "gamma" in leaf:
        p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
      elif leaf == "complex_weight":
        p.copy_(0.5 * noise)
      elif p.numel() == 1 or float(p.std()) < 1e-6:
        p.add_(0.2 * noise)
      else:
        fan_in = p.numel() // p.shape[0]
        p.add_(max(0.5 * float(p.std()), 0.5 / fan_in ** 0.5) * noise)
      p.copy_(p.half().float())
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_((0.2 * torch.randn(b.shape, generator=gen)).half().float())
      elif name.endswith("running_var"):
        b.copy_((0.5 + torch.rand(b.shape, generator=gen)).half().float())


def add_source_flags(parser: argparse.ArgumentParser, repository: str, *, git_dir: bool = True):
  """--repo (a checkout) or --git-dir [--commit] (read with git show), --full and --out."""
  parser.add_argument("--repo", required=not git_dir, help=f"a checkout of {repository}")
  if git_dir:
    parser.add_argument("--git-dir", help="its git directory (bare or not), read with git show")
    parser.add_argument("--commit", default="HEAD", help="with --git-dir: the commit to read")
  parser.add_argument("--full", action="store_true", help="full-size comparison; writes nothing")
  parser.add_argument("--out", default=GOLDEN, help="where the reduced fixture goes")


def main(doc: str, repository: str, files: Sequence[str], run: Callable[..., dict], argv=None):
  """The command line of a one-repository script: `run(root, commit, full=, out_dir=)` on the
  official `files`, from --repo or --git-dir."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_source_flags(parser, repository)
  args = parser.parse_args(argv)
  with official_files(args, files) as (root, commit):
    run(root, commit, full=args.full, out_dir=args.out)


def _git(args) -> tuple[list[str], str]:
  """The git command line of the official source and its commit id."""
  git_dir = getattr(args, "git_dir", None)
  if bool(args.repo) == bool(git_dir):
    raise SystemExit("give exactly one of --repo and --git-dir")
  git = ["git", "-C", args.repo] if args.repo else ["git", f"--git-dir={git_dir}"]
  rev = args.commit if git_dir else "HEAD"
  commit = subprocess.run(git + ["rev-parse", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
  return git, commit


def read_sources(args, files: Sequence[str]) -> tuple[dict[str, str], str]:
  """{path: text} of the official `files` and the commit id, from --repo or --git-dir."""
  git, commit = _git(args)
  out = {}
  for path in files:
    if args.repo:
      with open(os.path.join(args.repo, path)) as f:
        out[path] = f.read()
    else:
      out[path] = subprocess.run(git + ["show", f"{commit}:{path}"], check=True,
                                 capture_output=True, text=True).stdout
  return out, commit


@contextlib.contextmanager
def official_files(args, files: Sequence[str]) -> Iterator[tuple[str, str]]:
  """(root, commit): the checkout given by --repo, or a temporary copy of `files` (paths
  relative to the repository root) at --commit of --git-dir."""
  if args.repo:
    yield os.path.abspath(args.repo), _git(args)[1]
    return
  sources, commit = read_sources(args, files)
  with tempfile.TemporaryDirectory() as tmp:
    for path, text in sources.items():
      dest = os.path.join(tmp, path)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with open(dest, "w") as f:
        f.write(text)
    yield tmp, commit


def metadata(*, commit: str, repository: str, source_file: str, official: str, model: str,
             overrides: dict) -> dict:
  """The provenance entries of a fixture, and the create_model overrides the weights do not show."""
  return dict(commit=np.array(commit), repository=np.array(repository),
              source_file=np.array(source_file), official=np.array(official),
              model=np.array(model), overrides=np.array(json.dumps(overrides)))


def from_fixture(fixture: dict):
  """vitjax's model and variables for a fixture's state dict (`convert.from_official`)."""
  sys.path.insert(0, ROOT)
  from vitjax import convert  # pylint: disable=g-import-not-at-top
  state = {k[len("state/"):]: v for k, v in fixture.items() if k.startswith("state/")}
  model, variables, _ = convert.from_official(state, str(fixture["model"]),
                                              **json.loads(str(fixture["overrides"])))
  return model, variables


def logit_diffs(fixture: dict, pairs=None) -> list[float]:
  """max|logits_vitjax - logits_official| for each (images NHWC, logits) pair (default: the
  fixture's own), what the tests check."""
  import jax  # pylint: disable=g-import-not-at-top
  model, variables = from_fixture(fixture)
  apply = jax.jit(model.apply)
  pairs = pairs or [(fixture["images"], fixture["logits"])]
  return [float(np.abs(np.asarray(apply(variables, x.astype(np.float32))) - y).max())
          for x, y in pairs]


def compare(fixture: dict) -> float:
  return logit_diffs(fixture)[0]


def save(fixture: dict, name: str, out: dict, directory: str = GOLDEN) -> None:
  """Writes DIRECTORY/NAME (compressed) and records its path and size in `out`."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  np.savez_compressed(path, **fixture)
  out.update(fixture=os.path.relpath(path, ROOT), bytes=os.path.getsize(path))


def finish(out: dict, fixture: dict, name: str, *, full: bool, official, constructors,
           out_dir: str = GOLDEN) -> dict:
  """The end of a one-repository run: at full size the official parameter counts
  ({vitjax name: constructor name} `constructors` of module `official`), else the fixture
  written; then `out` printed as one JSON line and returned."""
  if full:
    out["official_params"] = {n: param_count(getattr(official, c)())
                              for n, c in constructors.items()}
  else:
    save(fixture, name, out, out_dir)
  print(json.dumps(out))
  return out


def param_count(model) -> int:
  return sum(p.numel() for p in model.parameters())
