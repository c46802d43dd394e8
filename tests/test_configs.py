"""Every config builds; the LookupViT configs run through the runner, including the ImageNet recipe on a stand-in."""
import glob
import importlib
import json
import os

import numpy as np
import pytest

from tests import fixtures
import vitjax
from vitjax import train
from vitjax.models import schedules

CONFIG_DIR = os.path.join(os.path.dirname(vitjax.__file__), "configs")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
               if not os.path.basename(p).startswith(("_", "common")))
TINY = dict(depth=1, width=32, mlp_dim=64, num_heads=2)


def get_config(name, arg=None):
  return importlib.import_module(f"vitjax.configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_builds_a_model(name, arg):
  c = get_config(name, arg)
  for field in ("model_name", "model", "seed", "total_steps", "batch_size", "lr", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "data"):
    assert field in c, field
  for field in ("name", "data_dir", "source_dir", "image_size", "train_split", "eval_split"):
    assert field in c.data, field
  model = vitjax.create_model(c.model_name, num_classes=10, **c.model)
  assert schedules.for_model(model, c).evals()  # grids are consistent with the model


def _lookup_config(fmnist, arg="runlocal"):
  c = get_config("lookupvit", arg)
  c.model.update(TINY)
  c.data.source_dir, c.data.data_dir = fmnist.source_dir, fmnist.data_dir
  c.data.augment = "none"
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 6, 6, 6, 3
  return c


def test_lookupvit_main_job_logs_every_grid(fmnist, tmp_path):
  c = _lookup_config(fmnist)
  row = train.train_and_evaluate(c, str(tmp_path))
  for h, w in c.eval_grids:
    assert 0.0 <= row[f"eval/accuracy@{h}x{w}"] <= 1.0
    assert row[f"eval/gmacs@{h}x{w}"] > 0
  big = max(c.eval_grids, key=lambda g: g[0] * g[1])
  assert row["eval/accuracy"] == row[f"eval/accuracy@{big[0]}x{big[1]}"]
  macs = [row[f"eval/gmacs@{h}x{w}"] for h, w in sorted(c.eval_grids)]
  assert macs == sorted(macs) and macs[0] < macs[-1]  # fewer compressed tokens, less compute
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("eval/accuracy@3x3" in r for r in rows)


@pytest.mark.parametrize("grids,match", [
    ([], r"config.grids is empty"),
    ([(3, 3), (20, 20)], r"grid"),
    ([(0, 3)], r"grid"),
])
def test_lookupvit_bad_grids(fmnist, tmp_path, grids, match):
  c = _lookup_config(fmnist)
  c.grids = grids
  c.eval_grids = []
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("weights", [(1.0,), (1.0, -1.0), (0.0, 0.0), (1.0, float("nan"))])
def test_bad_grid_weights_name_the_field(weights):
  c = get_config("lookupvit")
  c.grids, c.grid_weights = ((3, 3), (5, 5)), weights
  with pytest.raises(ValueError, match=r"config.grid_weights"):
    schedules.for_model(vitjax.create_model(c.model_name, num_classes=10), c)


def test_grid_sampling_follows_the_weights_and_is_a_function_of_the_step():
  c = get_config("lookupvit")
  c.grids, c.grid_weights = ((3, 3), (4, 4), (5, 5)), (1.0, 0.0, 3.0)
  c.seed = 0
  schedule = schedules.GridSchedule.from_config(c)
  drawn = [schedule.train_kwargs(step)["grid"] for step in range(1, 4001)]
  assert drawn.count((4, 4)) == 0
  assert abs(drawn.count((5, 5)) / len(drawn) - 0.75) < 0.03
  again = schedules.GridSchedule.from_config(c)  # a resumed run builds its schedule afresh
  assert drawn[:50] == [again.train_kwargs(step)["grid"] for step in range(1, 51)]
  # The draw is the one the runner has always made, so existing LookupViT runs reproduce.
  probs = np.array([0.25, 0.0, 0.75])
  assert drawn[:50] == [tuple(c.grids[np.random.default_rng([0, s]).choice(3, p=probs)])
                        for s in range(1, 51)]
  c.grid_weights = ()
  uniform = schedules.GridSchedule.from_config(c).probs
  assert list(uniform) == pytest.approx([1 / 3] * 3)
  assert schedules.GridSchedule.from_config(c).headline == "@5x5"  # plain eval keys: largest grid


def test_vit_rejects_grids(fmnist, tmp_path):
  c = get_config("vit", "runlocal")
  c.data.source_dir, c.data.data_dir = fmnist.source_dir, fmnist.data_dir
  c.grids = [(3, 3)]
  with pytest.raises(ValueError, match=r"config.grids.*has no compressed-token grid"):
    train.train_and_evaluate(c, str(tmp_path))


def test_lookupvit_imagenet_recipe_on_a_stand_in(tmp_path):
  """configs/lookupvit.py:imagenet builds and runs a few steps on a tiny stand-in imagenet2012."""
  data_dir = str(tmp_path / "tfds")
  fixtures.make_image_dataset(data_dir, "imagenet2012", n_train=32, n_eval=16,
                              image_shape=(40, 40, 3), num_classes=5)
  c = get_config("lookupvit", "imagenet,runlocal")
  assert c.model_name == "lookupvit_b16" and c.data.name == "imagenet2012"
  assert [tuple(g) for g in c.grids] == [(3, 3), (5, 5), (7, 7), (10, 10)]
  c.model.update(TINY)
  c.data.data_dir = data_dir
  c.data.image_size = 160  # a 10x10 lookup grid at patch 16: the largest training grid fits
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 2, 2, 2, 1
  row = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(f"eval/accuracy@{h}x{w}" for h, w in c.eval_grids) <= set(row)
