"""The training loop: end to end on a tiny local Fashion-MNIST, resume after SIGKILL, data parallelism, faults."""
import json
import os
import signal
import subprocess
import sys

from absl import flags
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_flags

import vitjax
from vitjax import checkpoint
from vitjax import train
from vitjax.configs import vit as vit_config
from vitjax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(depth=1, width=32, mlp_dim=64, num_heads=2, pool="gap")


class TinyBN(nn.Module):
  """A BatchNorm classifier small enough to compile in a second: the runner's BatchNorm path,
  independent of any real BatchNorm model in the zoo."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name="conv")(images)  # BN has the bias
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def _tiny_bn(num_classes=10, **unused_vit_fields):
  """Takes the ViT config's model fields too, so configs/vit.py runs it with model_name set."""
  return TinyBN(num_classes=num_classes)


# Imported by pytest and again by the CLI subprocesses (`import tests.test_train`): register once.
if "test_bn_tiny" not in registry.MODELS:
  registry.register_model("test_bn_tiny")(_tiny_bn)


def tiny_config(fmnist, **overrides):
  c = vit_config.get_config("runlocal")
  c.model = dict(TINY_MODEL)
  c.data.source_dir, c.data.data_dir = fmnist.source_dir, fmnist.data_dir
  c.data.image_size = 16
  c.data.augment = "none"
  c.total_steps, c.batch_size, c.eval_batch_size = 12, 16, 32
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 6, 4
  for k, v in overrides.items():
    c[k] = v
  return c


def test_end_to_end_writes_what_the_readme_says(fmnist, tmp_path):
  workdir = str(tmp_path / "run")
  row = train.train_and_evaluate(tiny_config(fmnist), workdir)
  assert {"eval/loss", "eval/accuracy", "eval/gmacs"} <= set(row)
  assert 0.0 <= row["eval/accuracy"] <= 1.0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  assert [r["step"] for r in eval_rows] == [6, 12]
  for r in train_rows:
    assert {"train/lr", "train/images_per_sec"} <= set(r) and np.isfinite(r["train/loss"])
  assert json.load(open(os.path.join(workdir, "config.json")))["model_name"] == "vit_nano4"
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]
  # Running again finds the final checkpoint and only re-evaluates.
  again = train.train_and_evaluate(tiny_config(fmnist), workdir)
  assert again["eval/accuracy"] == pytest.approx(row["eval/accuracy"])


def test_training_reduces_the_loss(fmnist, tmp_path):
  c = tiny_config(fmnist, total_steps=40, lr=3e-3, eval_every_steps=40, checkpoint_every_steps=40,
                  log_every_steps=10)
  train.train_and_evaluate(c, str(tmp_path))
  losses = [r["train/loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if "train/loss" in r]
  assert losses[-1] < 0.8 * losses[0], losses


_KILLER = """
import os, signal, sys
from vitjax import checkpoint
_save = checkpoint.Checkpointer.save
def save(self, step, *a, **k):
  if step == int(os.environ["KILL_AT_STEP"]):
    os.kill(os.getpid(), signal.SIGKILL)   # dies mid-training, before this checkpoint is written
  return _save(self, step, *a, **k)
checkpoint.Checkpointer.save = save
from vitjax import main
main.run()
"""


_MAIN = """
from vitjax import main
main.run()
"""
# Registers test_bn_tiny in the subprocess before the runner looks the model name up.
_WITH_TEST_MODELS = "import tests.test_train\n"


def _run_cli(args, env_extra=None, code=None, test_models=False):
  env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
  if test_models:
    code = _WITH_TEST_MODELS + (code or _MAIN)
  cmd = [sys.executable] + (["-c", code] if code else ["-m", "vitjax.main"]) + args
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _cli_args(fmnist, workdir):
  src, data_dir = fmnist.source_dir, fmnist.data_dir
  return ["--config=configs/vit.py:runlocal", f"--workdir={workdir}",
          f"--config.data.source_dir={src}", f"--config.data.data_dir={data_dir}",
          "--config.data.image_size=16", "--config.data.augment=crop_flip", "--config.model.depth=1",
          "--config.model.width=32", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
          "--config.model.dropout=0.1", "--config.total_steps=16", "--config.checkpoint_every_steps=4",
          "--config.eval_every_steps=8", "--config.log_every_steps=2"]


def _final(workdir):
  ckpt = vitjax.checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  state = ckpt.read_state(step)
  ckpt.close()
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  for r in rows:
    r.pop("train/images_per_sec", None)
  return step, state, rows


@pytest.mark.parametrize("model_name", ["vit_nano4", "test_bn_tiny"])
def test_sigkill_resume_matches_uninterrupted_run(fmnist, tmp_path, model_name):
  """A run killed with SIGKILL and started again ends with the same params (and BatchNorm
  statistics) and metrics."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  bn = model_name == "test_bn_tiny"
  args = lambda workdir: _cli_args(fmnist, workdir) + [f"--config.model_name={model_name}"]
  out = _run_cli(args(straight), test_models=bn)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "img/s" in out.stderr and "left" in out.stderr  # console progress
  out = _run_cli(args(killed), {"KILL_AT_STEP": "12"}, code=_KILLER, test_models=bn)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert max(int(s) for s in os.listdir(os.path.join(killed, "checkpoints"))) == 8
  out = _run_cli(args(killed), test_models=bn)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed" in out.stderr
  step_a, state_a, rows_a = _final(straight)
  step_b, state_b, rows_b = _final(killed)
  assert step_a == step_b == 16
  assert ("batch_stats" in state_a) == bn
  chex.assert_trees_all_close(state_a, state_b, atol=1e-6)
  assert rows_a == rows_b


@pytest.mark.parametrize("model_name", ["vit_nano4", "test_bn_tiny"])
def test_sharded_step_equals_single_device_step(model_name):
  """8 devices compute the step of the whole batch, BatchNorm statistics included: each device's
  2 images alone would give other means and variances."""
  assert jax.device_count() == 8
  model = vitjax.create_model(model_name, num_classes=10, **TINY_MODEL)
  tx = optax.adamw(1e-2)
  # Shard-dependent offsets: per-device batch statistics would differ from the global ones.
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1)) + jnp.arange(16)[:, None, None, None]
  batch = {"image": x, "label": jnp.arange(16) % 10}
  variables = model.init(jax.random.key(1), x[:1])
  params = variables["params"]
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  if model_name == "test_bn_tiny":
    state["batch_stats"] = variables["batch_stats"]
  step_fn = train.make_train_step(model, tx)
  key = jax.random.key(2)

  single = jax.device_put((state, batch), jax.devices()[0])
  s1, _ = jax.jit(step_fn)(*single, key)
  mesh = train.make_mesh()
  repl = jax.NamedSharding(mesh, jax.P())
  sharded_batch = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data")))
  s8, _ = jax.jit(step_fn, out_shardings=(repl, repl))(jax.device_put(state, repl), sharded_batch, key)
  assert len(sharded_batch["image"].sharding.device_set) == 8
  chex.assert_trees_all_close(s1["params"], s8["params"], atol=1e-5)
  # And the step really moved the parameters.
  assert not np.allclose(s1["params"]["head"]["kernel"], params["head"]["kernel"])
  if model_name == "test_bn_tiny":
    chex.assert_trees_all_close(s1["batch_stats"], s8["batch_stats"], atol=1e-5)
    # The running mean moved halfway (momentum 0.5) to the mean of the whole batch's features.
    feats = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False).apply({"params": params["conv"]}, x)
    np.testing.assert_allclose(s1["batch_stats"]["bn"]["mean"], 0.5 * feats.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


def _bn_config(fmnist, **overrides):
  c = tiny_config(fmnist, model_name="test_bn_tiny", **overrides)
  c.model = {}
  return c


def test_batchnorm_model_trains_checkpoints_and_fine_tunes_its_statistics(fmnist, tmp_path):
  """batch_stats live in the train state: updated by training, saved, used by evals, and carried
  from a parameter checkpoint by init_from."""
  run = str(tmp_path / "run")
  c = _bn_config(fmnist, total_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
  row = train.train_and_evaluate(c, run)
  assert {"eval/loss", "eval/accuracy", "eval/gmacs"} <= set(row) and row["eval/gmacs"] > 0
  step, state, _ = _final(run)
  assert step == 4 and set(state) == {"params", "opt_state", "step", "batch_stats"}
  stats = state["batch_stats"]["bn"]
  assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)
  # A fine-tune from those variables evaluates (train=False: running averages) as the run did.
  params_dir = str(tmp_path / "params")
  checkpoint.save_params(params_dir, state["params"], {"model_name": "test_bn_tiny"},
                         batch_stats=state["batch_stats"])
  tuned = train.train_and_evaluate(
      _bn_config(fmnist, total_steps=0, init_from=params_dir, init_from_skip=""),
      str(tmp_path / "tuned"))
  assert tuned["eval/loss"] == pytest.approx(row["eval/loss"], rel=1e-5)


def test_batchnorm_model_needs_batch_stats_in_its_checkpoints(fmnist, tmp_path):
  """Resuming, or init_from, with a checkpoint that has no batch_stats: one clear error each."""
  params_dir = str(tmp_path / "params")
  model = vitjax.create_model("test_bn_tiny", num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  checkpoint.save_params(params_dir, params, {"model_name": "test_bn_tiny"})
  with pytest.raises(ValueError, match=r"init_from checkpoint .*params' has no batch_stats, but "
                                       r"model_name='test_bn_tiny' has BatchNorm layers: bn"):
    train.train_and_evaluate(_bn_config(fmnist, init_from=params_dir), str(tmp_path / "tuned"))
  # A workdir whose checkpoint was written by a model without BatchNorm.
  workdir = tmp_path / "run"
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(2, dict(params=params, opt_state=jnp.zeros(()), step=jnp.asarray(2, jnp.int32)), {})
  ckpt.close()
  with pytest.raises(ValueError, match=r"checkpoint .*2' has no batch_stats, but "
                                       r"model_name='test_bn_tiny' has BatchNorm layers: bn.*new workdir"):
    train.train_and_evaluate(_bn_config(fmnist), str(workdir))


def test_batch_size_not_divisible_by_devices(fmnist, tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size=12 .*device count 8"):
    train.train_and_evaluate(tiny_config(fmnist, batch_size=12), str(tmp_path))


def test_unknown_model_name(fmnist, tmp_path):
  with pytest.raises(ValueError, match=r"model_name='vit_nan4'.*vit_nano4"):
    train.train_and_evaluate(tiny_config(fmnist, model_name="vit_nan4"), str(tmp_path))


def test_image_size_not_divisible_by_patch(fmnist, tmp_path):
  c = tiny_config(fmnist)
  c.data.image_size = 18
  with pytest.raises(ValueError, match=r"data.image_size.*18x18.*patch_size=4"):
    train.train_and_evaluate(c, str(tmp_path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fmnist, tmp_path):
  c = tiny_config(fmnist, total_steps=12, checkpoint_every_steps=2, log_every_steps=2)
  train.train_and_evaluate(tiny_config(fmnist, total_steps=4, checkpoint_every_steps=2), str(tmp_path))
  c.lr = 1e30  # Blows the parameters up on the first step after the resume.
  with pytest.raises(FloatingPointError, match=r"at step 5.*last good checkpoint is step 4"):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4]


def test_unknown_config_key_names_the_field(fmnist, tmp_path):
  out = _run_cli(["--config=configs/vit.py:runlocal", f"--workdir={tmp_path}", "--config.batchsize=8"])
  assert out.returncode != 0
  assert "batchsize" in out.stderr and "batch_size" in out.stderr, out.stderr[-2000:]


def test_config_resolves_against_the_package(tmp_path):
  from vitjax import main  # pylint: disable=g-import-not-at-top
  resolved = main.resolve_config_arg("configs/lookupvit.py:runlocal")
  assert resolved.endswith(os.path.join("vitjax", "configs", "lookupvit.py:runlocal"))
  assert os.path.exists(resolved.rsplit(":", 1)[0])
  assert main.default_workdir("configs/vit.py") == os.path.join("runs", "vit")


def test_grids_can_be_overridden_on_the_command_line():
  """`--config.grids="((3, 3), (5, 5))"` parses (a list-typed field could not be overridden)."""
  from vitjax import main  # pylint: disable=g-import-not-at-top
  argv = [sys.argv[0], "--config=" + main.resolve_config_arg("configs/lookupvit.py"),
          "--config.grids=((3, 3), (5, 5))", "--config.eval_grids=((2, 2),)",
          "--config.grid_weights=(1.0, 3.0)"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert [tuple(g) for g in fv.config.grids] == [(3, 3), (5, 5)]
  assert [tuple(g) for g in fv.config.eval_grids] == [(2, 2)]
  assert tuple(fv.config.grid_weights) == (1.0, 3.0)
