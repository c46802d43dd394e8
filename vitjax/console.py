"""The runner's console: its own lines, other libraries' INFO logs off, a live progress bar on a terminal.

A run prints what a user watches for (DESIGN.md, "the console belongs to the runner"): the devices, the
model and its parameter count, the data, progress (step, loss, images/s, lr, time left), evals and one
line per checkpoint save. Those lines go through the `vitjax` logger to stderr as `HH:MM:SS message`.

Other libraries log a great deal at INFO: Orbax writes some fifteen lines per checkpoint save (D2H
transfers, OCDBT merges, renames), TFDS announces every dataset it opens, JAX reports each backend it
probes. At the default verbosity those records are dropped; warnings and errors still show. They
come back with `--verbosity=1` (INFO) or `--verbosity=2` (everything) on any vitjax command, or with the
environment variable VITJAX_VERBOSITY=1 for code that calls the library directly.

When stderr is a terminal, training progress is a live bar (rich, which Flax already depends on) and
the other runner lines print above it. Redirected to a file or a pipe, progress stays one log line per
`log_every_steps`, which is what a log file should hold. VITJAX_PROGRESS=0 turns the bar off.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time

LOGGER = logging.getLogger("vitjax")
ENV_VERBOSITY = "VITJAX_VERBOSITY"
ENV_PROGRESS = "VITJAX_PROGRESS"
# Python loggers of libraries the runner uses; quiet runs raise them to WARNING. Orbax and TFDS log
# through absl's logger instead, which a filter handles (see _ThirdParty).
THIRD_PARTY_LOGGERS = ("jax", "jaxlib", "orbax", "tensorflow_datasets", "grain", "etils", "PIL",
                       "matplotlib", "fsspec", "urllib3", "flax", "optax", "chex")
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_live = None  # the rich Progress of a live bar, while one is showing
_state: dict = {}  # the --verbosity a command line passed to setup()


def log(msg: str, *args):
  """One runner line (printf-style arguments, as the logging module takes them)."""
  _ensure_handler()
  LOGGER.info(msg, *args)


def warn(msg: str, *args):
  _ensure_handler()
  LOGGER.warning(msg, *args)


def _ensure_handler():
  """The runner's lines show even when a library call (a colab) never called setup()."""
  if not any(isinstance(h, _Handler) for h in LOGGER.handlers):
    LOGGER.addHandler(_Handler())
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # printed once, by _Handler, not again by absl's handler on the root


def _third_party(record: logging.LogRecord) -> bool:
  """Whether a record comes from an installed library (not vitjax, not the user's own code)."""
  if record.name == "vitjax" or record.name.startswith("vitjax."):
    return False
  path = os.path.abspath(record.pathname or "")
  if path.startswith(_PKG_DIR + os.sep):
    return False
  return any(part in ("site-packages", "dist-packages") for part in path.split(os.sep))


class _ThirdParty(logging.Filter):
  """Drops installed libraries' records below `min_level`."""

  def __init__(self, min_level: int):
    super().__init__()
    self.min_level = min_level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self.min_level or not _third_party(record)


class _Handler(logging.Handler):
  """Writes runner lines to the current sys.stderr (so captured streams work), or above a live bar."""

  def emit(self, record: logging.LogRecord):
    try:
      text = time.strftime("%H:%M:%S", time.localtime(record.created)) + " "
      if record.levelno >= logging.WARNING:
        text += record.levelname + ": "
      text += record.getMessage()
      if _live is not None:
        _live.console.print(text, markup=False, highlight=False, soft_wrap=True)
      else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def verbosity(flag_value: int | None = None) -> int:
  """The verbosity asked for: the --verbosity flag when given, else VITJAX_VERBOSITY, else 0."""
  if flag_value is not None and flag_value > 0:
    return flag_value
  try:
    return int(os.environ.get(ENV_VERBOSITY, "0") or 0)
  except ValueError:
    raise ValueError(f"{ENV_VERBOSITY}={os.environ[ENV_VERBOSITY]!r} must be an integer "
                     "(0: runner lines only, 1: other libraries' INFO logs too, 2: everything)"
                     ) from None


def quiet() -> bool:
  """True when other libraries' INFO output (logs, TFDS's progress bars and prints) is off."""
  return verbosity(_state.get("verbosity")) < 1


def setup(flag_verbosity: int | None = None):
  """Installs the runner's handler and the third-party filter; safe to call again (it updates).

  Args:
    flag_verbosity: absl's --verbosity when a command line parsed one (0 = default); None from
      library calls, which then follow VITJAX_VERBOSITY.
  """
  if flag_verbosity is not None:
    _state["verbosity"] = flag_verbosity
  level = verbosity(_state.get("verbosity"))
  _ensure_handler()
  min_level = logging.WARNING if level <= 0 else logging.INFO if level == 1 else logging.NOTSET
  # absl's logger carries Orbax's and TFDS's records; a filter keeps the user's own absl lines.
  targets = [logging.getLogger("absl")] + list(logging.getLogger().handlers)
  for target in targets:
    for f in [f for f in target.filters if isinstance(f, _ThirdParty)]:
      target.removeFilter(f)
    target.addFilter(_ThirdParty(min_level))
  for name in THIRD_PARTY_LOGGERS:  # absl's own level stays absl's --verbosity: the filter works there
    logger = logging.getLogger(name)
    if level <= 0 and logger.level in (logging.NOTSET, logging.INFO, logging.DEBUG):
      logger.setLevel(logging.WARNING)
    elif level >= 1 and logger.level == logging.WARNING:
      logger.setLevel(logging.NOTSET)
  if "tensorflow_datasets" in sys.modules:
    _tfds_progress_bars()


def _tfds_progress_bars():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.display_progress_bar(not quiet())


@contextlib.contextmanager
def library_output():
  """Around a TFDS build: while quiet, its progress bars are off and what it prints is dropped
  (TFDS prints "Downloading and preparing dataset ..." to stdout, not through logging)."""
  if not quiet():
    yield
    return
  _tfds_progress_bars()
  with contextlib.redirect_stdout(io.StringIO()):
    yield


def duration(seconds: float) -> str:
  """'1h02m', '3m05s' or '?' (not finite)."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, loss: float, images_per_sec: float, lr: float,
                  seconds_left: float) -> str:
  return (f"step {step}/{total} | loss {loss:.4f} | {images_per_sec:.0f} img/s | lr {lr:.2e} | "
          f"{duration(seconds_left)} left")


def live_wanted(stream=None) -> bool:
  """A live bar only on a terminal, and not when VITJAX_PROGRESS=0."""
  stream = sys.stderr if stream is None else stream
  if os.environ.get(ENV_PROGRESS, "1") == "0":
    return False
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class Progress:
  """Training progress: a live bar on a terminal, else one log line per report.

      progress = Progress(total_steps, start_step)
      progress.advance(step)                       # every step (cheap; redraws are rate-limited)
      progress.report(step, loss, ips, lr, left)   # every log_every_steps; left in seconds
      progress.close()
  """

  def __init__(self, total: int, start: int = 0, *, live: bool | None = None, stream=None):
    global _live
    self.total = total
    self._bar = None
    if live if live is not None else live_wanted(stream):
      from rich import console as rich_console  # pylint: disable=g-import-not-at-top
      from rich import progress as rp  # pylint: disable=g-import-not-at-top
      self._bar = rp.Progress(
          rp.TextColumn("step {task.completed}/{task.total}"), rp.BarColumn(),
          rp.TextColumn("{task.fields[status]}"),
          console=rich_console.Console(file=stream or sys.stderr, force_terminal=True),
          transient=False)
      self._task = self._bar.add_task("train", total=total, completed=start, status="")
      self._bar.start()
      _live = self._bar

  @property
  def live(self) -> bool:
    return self._bar is not None

  def advance(self, step: int):
    if self._bar is not None:
      self._bar.update(self._task, completed=step)

  def report(self, step: int, loss: float, images_per_sec: float, lr: float, seconds_left: float):
    line = progress_line(step, self.total, loss, images_per_sec, lr, seconds_left)
    if self._bar is None:
      log("%s", line)
    else:
      status = line.split(" | ", 1)[1]  # the bar shows the step itself
      self._bar.update(self._task, completed=step, status=status)

  def close(self):
    global _live
    if self._bar is not None:
      self._bar.stop()
      self._bar = None
      _live = None
