"""The console: the runner's own lines only, other libraries' INFO logs off unless asked for, a live
bar on a terminal, and config errors reported before any data is read."""
import io
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from PIL import Image
import pytest

import vitjax
from vitjax import checkpoint
from vitjax import console
from vitjax import train
from vitjax.configs import lookupvit as lookupvit_config
from vitjax.configs import vit as vit_config
from vitjax.data import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.depth=1", "--config.model.width=32", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64"]
# Every line a run may print, by kind. A line that matches none came from another library.
RUNNER_LINES = {
    "devices": r"devices: 8 x cpu \(cpu\), process 0/1, JAX \S+",
    "build": r"building Fashion-MNIST into \S+ from \S+",
    "data": r"data vitjax_fashion_mnist:1\.0\.0: 256 train \(train\), 45 eval \(test\), 28x28x1 "
            r"images, 10 classes",
    "model": r"model lookupvit_nano4: [\d,]+ params",
    "progress": r"step \d+/40 \| loss \d\.\d{4} \| \d+ img/s \| lr \S+ \| \d+m\d\ds left",
    "checkpoint": r"checkpoint step \d+: \S+/checkpoints/\d+",
    "eval": r"eval step \d+@\dx\d: loss \d\.\d{4} \| top-1 \d\.\d{4} \| top-5 \d\.\d{4} \| "
            r"\d\.\d{4} GMACs/image",
    "done": r"done: step 40 in \d+m\d\ds, eval top-1 \d\.\d{4}, top-5 \d\.\d{4}; workdir \S+",
}


def _run(args, timeout=900):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("VITJAX_VERBOSITY", None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_forty_step_lookupvit_run_prints_only_runner_lines(fmnist, tmp_path):
  """The issue's run (lookupvit runlocal, 40 steps; a tiny model and two grids here): every line is
  the runner's, one per progress report, checkpoint and eval, and nothing from Orbax or TFDS."""
  workdir = tmp_path / "run"
  out = _run(["-m", "vitjax.main", "--config=configs/lookupvit.py:runlocal",
              "--config.total_steps=40", f"--workdir={workdir}",
              f"--config.data.source_dir={fmnist.source_dir}",
              f"--config.data.data_dir={fmnist.data_dir}", *TINY,
              "--config.grids=((3, 3), (5, 5))", "--config.eval_grids=((3, 3), (5, 5))",
              "--config.grid_weights=(1.0, 3.0)"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == ""
  counts = dict.fromkeys(RUNNER_LINES, 0)
  for line in out.stderr.splitlines():
    m = re.fullmatch(r"\d\d:\d\d:\d\d (.*)", line)
    kind = m and next((k for k, p in RUNNER_LINES.items() if re.fullmatch(p, m.group(1))), None)
    assert kind, f"not a runner line: {line!r}\n{out.stderr}"
    counts[kind] += 1
  assert counts.pop("build") <= 1  # the shared dataset may have been built by an earlier test
  assert counts == {"devices": 1, "data": 1, "model": 1, "progress": 8, "checkpoint": 4,
                    "eval": 8, "done": 1}, out.stderr


def test_verbosity_brings_other_libraries_logs_back(tmp_path):
  """Orbax logs a dozen INFO lines when it reads a checkpoint: hidden by default, back with
  --verbosity=1."""
  model = vitjax.create_model("vit_nano4", num_classes=10, depth=1, width=32, num_heads=2,
                              mlp_dim=64)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  ckpt = str(tmp_path / "params")
  checkpoint.save_params(ckpt, params, meta={
      "model_name": "vit_nano4", "image_size": [16, 16],
      "model_overrides": {"depth": 1, "width": 32, "num_heads": 2, "mlp_dim": 64}})
  image = str(tmp_path / "x.png")
  Image.new("L", (20, 20), 128).save(image)
  quiet = _run(["-m", "vitjax.predict", f"--checkpoint={ckpt}", image])
  loud = _run(["-m", "vitjax.predict", f"--checkpoint={ckpt}", "--verbosity=1", image])
  assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
  assert quiet.stdout == loud.stdout
  assert [l for l in quiet.stderr.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", l)] == []
  assert len(re.findall(r"\] .*", loud.stderr)) >= 5 and "orbax" in loud.stderr.lower()


def test_the_filter_keeps_warnings_and_the_users_own_lines(monkeypatch):
  lib = logging.LogRecord("absl", logging.INFO, "/x/site-packages/orbax/checkpoint/manager.py",
                          1, "saving", None, None)
  warning = logging.LogRecord("absl", logging.WARNING, lib.pathname, 1, "disk full", None, None)
  user = logging.LogRecord("absl", logging.INFO, "/home/me/my_script.py", 1, "mine", None, None)
  monkeypatch.delenv(console.ENV_VERBOSITY, raising=False)
  console.setup()
  absl_logger = logging.getLogger("absl")
  assert not absl_logger.filter(lib)
  assert absl_logger.filter(warning) and absl_logger.filter(user)
  monkeypatch.setenv(console.ENV_VERBOSITY, "1")
  console.setup()
  assert absl_logger.filter(lib)
  monkeypatch.delenv(console.ENV_VERBOSITY)
  console.setup()
  assert not absl_logger.filter(lib)


def test_progress_is_a_live_bar_on_a_terminal_and_lines_otherwise(monkeypatch, capsys):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  assert console.live_wanted(Tty()) and not console.live_wanted(io.StringIO())
  monkeypatch.setenv(console.ENV_PROGRESS, "0")
  assert not console.live_wanted(Tty())
  stream = io.StringIO()
  bar = console.Progress(10, 0, live=True, stream=stream)
  for step in range(1, 11):
    bar.advance(step)
  console.log("eval step 10: shown above the bar")
  bar.report(10, 0.5, 123.0, 1e-3, 0.0)
  bar.close()
  shown = stream.getvalue()
  assert "step 10/10" in shown and "123 img/s" in shown and "eval step 10: shown" in shown
  capsys.readouterr()
  lines = console.Progress(10, 0, live=False)
  lines.report(5, 0.5, 123.0, 1e-3, 65.0)
  lines.close()
  assert re.search(r"\d\d:\d\d:\d\d step 5/10 \| loss 0\.5000 \| 123 img/s \| lr 1\.00e-03 \| "
                   r"1m05s left", capsys.readouterr().err)


@pytest.mark.parametrize("field,value,needle", [
    ("image_size", 18, r"config.data.image_size=18 gives 18x18 images, but "
                       r"model_name='vit_nano4' needs a multiple of its total stride 4 "
                       r"\(patch_size=4\)"),
    ("model_name", "vit_nan4", r"Unknown model model_name='vit_nan4'"),
    ("batch_size", 12, r"config.batch_size=12 is not divisible by the device count 8"),
    ("channels", 2, r"Unknown data.channels=2"),
])
def test_config_errors_come_before_the_data(tmp_path, monkeypatch, field, value, needle):
  """With the dataset absent, each config error is still the one reported, and nothing is written."""
  monkeypatch.setattr(fashion_mnist, "SOURCE_DIRS", ())
  monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL", None)
  c = vit_config.get_config("runlocal")
  c.data.data_dir = str(tmp_path / "no_data")
  if field in ("image_size", "channels"):
    c.data[field] = value
  else:
    c[field] = value
  with pytest.raises(ValueError, match=needle):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "no_data")


def test_lookupvit_grid_errors_come_before_the_data(tmp_path):
  c = lookupvit_config.get_config("runlocal")
  c.data.data_dir = str(tmp_path / "no_data")
  c.grids = ()
  with pytest.raises(ValueError, match=r"config.grids is empty"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c.grids, c.grid_weights = ((3, 3), (5, 5)), (1.0,)
  with pytest.raises(ValueError, match=r"config.grid_weights=\(1.0,\)"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_command_line_error_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  out = _run(["-m", "vitjax.main", "--config=configs/vit.py:runlocal",
              "--config.data.image_size=18", f"--config.data.data_dir={tmp_path / 'none'}",
              f"--workdir={workdir}"])
  assert out.returncode == 2
  assert out.stderr.splitlines()[-1].startswith("error: config.data.image_size=18 gives 18x18")
  assert "Traceback" not in out.stderr and not workdir.exists()
