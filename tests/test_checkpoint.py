"""Parameter checkpoints: save_params / load_variables with BatchNorm statistics, and init_from's strict merge."""
import jax
import numpy as np
import pytest

from vitjax import checkpoint

PARAMS = {"stem": {"kernel": np.ones((3, 4), np.float32)}, "head": {"kernel": np.ones((4, 2), np.float32)}}
STATS = {"stem_bn": {"mean": np.full((4,), 0.5, np.float32), "var": np.full((4,), 2.0, np.float32)}}


def _zeros(tree):
  return jax.tree.map(np.zeros_like, tree)


def test_params_and_batch_stats_round_trip(tmp_path):
  checkpoint.save_params(str(tmp_path / "bn"), PARAMS, {"model_name": "m"}, batch_stats=STATS)
  variables, meta = checkpoint.load_variables(str(tmp_path / "bn"))
  assert meta == {"model_name": "m"} and set(variables) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], STATS)
  # load_params keeps its (params, meta) contract, with or without statistics in the checkpoint.
  params, meta = checkpoint.load_params(str(tmp_path / "bn"))
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  checkpoint.save_params(str(tmp_path / "plain"), PARAMS)
  variables, meta = checkpoint.load_variables(str(tmp_path / "plain"))
  assert set(variables) == {"params"} and meta == {}


def test_init_from_merges_params_and_batch_stats_keeping_skipped_ones(tmp_path):
  path = str(tmp_path / "ck")
  checkpoint.save_params(path, PARAMS, batch_stats=STATS)
  params, stats = checkpoint.load_init_from(path, _zeros(PARAMS), skip="^head/", model_name="m",
                                            batch_stats=_zeros(STATS))
  np.testing.assert_array_equal(params["stem"]["kernel"], 1.0)
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)  # skipped: keeps its fresh init
  np.testing.assert_array_equal(stats["stem_bn"]["var"], 2.0)
  # A model without BatchNorm gets no statistics back, and a checkpoint that has some is refused.
  with pytest.raises(ValueError, match=r"unexpected batch_stats/stem_bn/mean"):
    checkpoint.load_init_from(path, _zeros(PARAMS), skip="", model_name="m")


def test_init_from_is_strict_and_names_every_problem(tmp_path):
  path = str(tmp_path / "ck")
  checkpoint.save_params(path, PARAMS, batch_stats=STATS)
  fresh = {"stem": {"kernel": np.zeros((3, 5), np.float32)}, "extra": {"bias": np.zeros((2,))}}
  stats = {"stem_bn": {"mean": np.zeros((5,)), "var": np.zeros((4,))}}
  with pytest.raises(ValueError) as e:
    checkpoint.load_init_from(path, fresh, skip="", model_name="m", batch_stats=stats)
  msg = str(e.value)
  assert msg.startswith(f"init_from={path!r} does not fit model_name='m' (init_from_skip=''): ")
  for problem in ("shape stem/kernel: checkpoint (3, 4) vs model (3, 5)", "missing extra/bias",
                  "unexpected head/kernel", "shape batch_stats/stem_bn/mean"):
    assert problem in msg, msg


def test_init_from_without_batch_stats_for_a_batchnorm_model(tmp_path):
  path = str(tmp_path / "ck")
  checkpoint.save_params(path, PARAMS)
  with pytest.raises(ValueError, match=r"init_from checkpoint .* has no batch_stats, but "
                                       r"model_name='m' has BatchNorm layers: stem_bn"):
    checkpoint.load_init_from(path, _zeros(PARAMS), skip="", model_name="m",
                              batch_stats=_zeros(STATS))
