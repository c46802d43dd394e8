"""Test-only: import timm on a CPU-only torch next to a torchvision wheel built for CUDA.

The torchvision release that matches torch 2.13 on PyPI is a CUDA build. On a CPU-only torch its
compiled ops library does not load, yet `torchvision/_meta_registrations.py` still calls
`torch.library.register_fake("torchvision::nms")`, which raises "operator torchvision::nms does
not exist" and makes `import torchvision` (and so `import timm`) fail.

The workaround: while torchvision is being imported, and only then, `register_fake` skips ops
that were never registered and behaves normally for every op that exists. Nothing else is
patched; the original function is restored right after the import. With a torchvision that
matches its torch the ops exist, so the patch changes nothing. timm's models never call the
detection ops (nms, roi_align) whose fake kernels are skipped.

This lives in tests/ on purpose: the library never imports torch or torchvision.
"""
from __future__ import annotations

import contextlib
import sys

import pytest


def _op_exists(torch, qualname: str) -> bool:
  namespace, _, name = qualname.partition("::")
  try:
    getattr(getattr(torch.ops, namespace), name.split(".")[0])
  except (AttributeError, RuntimeError):
    return False
  return True


@contextlib.contextmanager
def _fake_registration_skips_missing_ops(torch):
  original = torch.library.register_fake

  def register_fake(op, func=None, /, *args, **kwargs):
    if isinstance(op, str) and not _op_exists(torch, op):
      return func if func is not None else (lambda f: f)
    return original(op, func, *args, **kwargs)

  torch.library.register_fake = register_fake
  try:
    yield
  finally:
    torch.library.register_fake = original


def import_timm():
  """Returns the `timm` module, or skips the calling test with the reason it cannot be imported."""
  torch = pytest.importorskip("torch", reason="the timm parity tests need torch (pip install torch)")
  if "torchvision" not in sys.modules:
    with _fake_registration_skips_missing_ops(torch):
      try:
        import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        pass  # timm's own import below reports what is missing.
      except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f"torchvision does not import with this torch: {type(e).__name__}: {e}")
  return pytest.importorskip("timm", reason="the timm parity tests need timm (pip install timm)")
