"""Runs an experiment: `python -m vitjax.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.K=V]`.

`configs/NAME.py` is resolved against the installed package when it does not exist relative to the working
directory, so the command works from anywhere. The default workdir is `runs/<config name>`; running the same
command again resumes from the last checkpoint.

The console shows the runner's lines only; `--verbosity=1` adds other libraries' INFO logs (Orbax, TFDS,
JAX) and the traceback of an error, which is otherwise one `error: ...` line naming what to fix.
`vitjax.evaluate` and `vitjax.predict` share the config handling below.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def define_config_flag(help_text: str = "Experiment config file (configs/NAME.py[:ARG])."):
  """Defines --config (and its --config.KEY=VALUE overrides) once per process."""
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


def resolve_config_arg(value: str) -> str:
  """'configs/x.py:arg' -> the package's vitjax/configs/x.py:arg when the path is not found locally."""
  path, sep, arg = value.partition(".py")
  path += ".py" if sep else ""
  if os.path.exists(path) or not path:
    return value
  candidate = os.path.join(_PKG_DIR, "configs", os.path.basename(path))
  return candidate + arg if os.path.exists(candidate) else value


def _resolve_argv(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config_arg(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_arg(out[i + 1])
  return out


def _load_config(value: str):
  path, _, arg = value.partition(".py")
  spec = importlib.util.spec_from_file_location("_vitjax_config", path + ".py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg.lstrip(":") or None)


def check_overrides(argv: list[str]):
  """Exits with one clear message when a --config.KEY override names a key the config lacks."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if value is None or not os.path.exists(value.partition(".py")[0] + ".py"):
    return
  config = _load_config(value)
  for a in argv:
    if not a.startswith("--config."):
      continue
    node, parts = config, a[len("--config."):].split("=", 1)[0].split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(["config"] + parts[:i])
        close = difflib.get_close_matches(part, keys, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        sys.exit(f"Unknown config key {'.'.join(['config'] + parts[:i + 1])!r}.{hint} "
                 f"Keys of {where}: {', '.join(sorted(keys)) or '(none: it is a value)'}.")
      node = node[part]


def default_workdir(config_value: str) -> str:
  name = os.path.splitext(os.path.basename(config_value.partition(".py")[0] + ".py"))[0]
  arg = config_value.partition(".py")[2].lstrip(":")
  return os.path.join("runs", name + (f"_{arg.replace(',', '_').replace('=', '-')}" if arg else ""))


def cli_errors(fn, *args, **kwargs):
  """Runs fn(*args) for a command line: a ValueError (bad input) becomes one `error: ...` line and
  exit status 2; --verbosity=1 shows the traceback instead."""
  from vitjax import console  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args, **kwargs)
  except (ValueError, FloatingPointError) as e:
    if console.verbosity(flags.FLAGS.verbosity) >= 1:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; options are --config=..., "
                         "--workdir=... and --config.KEY=VALUE.")
  from vitjax import console  # pylint: disable=g-import-not-at-top
  console.setup(flags.FLAGS.verbosity)
  from vitjax import train  # pylint: disable=g-import-not-at-top
  config_value = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "run")
  workdir = flags.FLAGS.workdir or default_workdir(config_value)
  cli_errors(train.train_and_evaluate, flags.FLAGS.config, workdir)


def prepare_argv():
  """Resolves configs/NAME.py against the package and checks --config.KEY overrides (sys.argv)."""
  sys.argv = _resolve_argv(sys.argv)
  check_overrides(sys.argv)


def run():
  define_config_flag()
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
  prepare_argv()
  app.run(main)


if __name__ == "__main__":
  run()
