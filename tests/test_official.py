"""Tests for vitjax.convert.from_official: the authors' own code, through golden fixtures.

Each tests/golden/<model>.npz was written by experiments/golden/make.py from a checkout of the
official repository (commit id inside): a reduced official model with seeded, perturbed weights,
its state dict under the official key names, a fixed input and the official logits. Here each is
converted and must give the same logits (1e-4) without torch or the network. Bad state dicts get
one error listing every problem, and a state dict of another family says which family it is.
"""
import glob
import json
import os
import re

import jax
import numpy as np
import pytest

from vitjax import checkpoint
from vitjax import convert
from vitjax.convert import __main__ as convert_cli
from vitjax.convert import official

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FIXTURES = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(GOLDEN, "*.npz")))


def load_fixture(name):
  with np.load(os.path.join(GOLDEN, f"{name}.npz")) as f:
    data = {k: f[k] for k in f.files}
  state = {k[len("state/"):]: v for k, v in data.items() if k.startswith("state/")}
  return state, data


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_logits_match_the_official_code(name):
  state, data = load_fixture(name)
  assert re.fullmatch(r"[0-9a-f]{40}", str(data["commit"])), "fixture without its commit id"
  family, vitjax_name = official.resolve(str(data["model"]))   # a vitjax or an official name
  assert family.repository == str(data["repository"])
  model, variables, meta = convert.from_official(state, str(data["model"]),
                                                 **json.loads(str(data["overrides"])))
  assert meta["source"] == "official" and meta["model_name"] == vitjax_name
  # Every parameter and BatchNorm statistic of the state dict is used, none is invented.
  used = sum(v.size for k, v in state.items() if not any(
      re.fullmatch(p, k) for p in family.ignore))
  assert sum(np.size(x) for x in jax.tree.leaves(variables)) == used
  logits = jax.jit(model.apply)(variables, data["images"].astype(np.float32))
  expected = data["logits"]
  assert float(np.std(expected, axis=0).max()) > 1e-2      # the inputs show in the logits
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_official_constructor_names_resolve():
  assert official.resolve("hornet_tiny_gf")[1] == "hornet_t_gf"
  with pytest.raises(ValueError, match="name='hornet_tiny'.*hornet_tiny_7x7"):
    official.resolve("hornet_tiny")


def test_missing_extra_and_misshaped_keys_in_one_error():
  state, _ = load_fixture("hornet_t")
  state = dict(state)
  state["stages.0.0.gnconv.extra.weight"] = np.zeros(3, np.float32)     # unknown key
  del state["stages.3.0.pwconv2.bias"]                                   # missing
  state["head.bias"] = np.zeros(11, np.float32)                          # mis-shaped
  with pytest.raises(ValueError) as e:
    convert.from_official(state, "hornet_t")
  msg = str(e.value)
  assert msg.count("Cannot convert") == 1 and "nothing was loaded" in msg
  assert "stages.0.0.gnconv.extra.weight" in msg
  assert "stage_3_block_0/mlp/Dense_1/bias" in msg
  assert "head.bias (11,)" in msg


@pytest.mark.parametrize("fixture", ["hornet_t", "rmt_t"])
def test_a_state_dict_of_another_family_is_named(fixture):
  with pytest.raises(ValueError, match="Not an official hornet") as e:
    convert.from_official({"blocks.0.weight": np.zeros(3)}, "hornet_t")
  assert "blocks.0.weight" in str(e.value)
  state, data = load_fixture(fixture)
  family, _ = official.resolve(str(data["model"]))
  for other in sorted(set(official.supported_models()) - set(family.models)):
    with pytest.raises(ValueError, match=rf"looks like an official {family.name} "
                                         rf"\({family.repository}\)"):
      convert.from_official(state, other)


def test_rmt_decay_buffers_set_the_decay_and_are_checked():
  state, _ = load_fixture("rmt_t")
  read = official.FAMILIES["rmt"].overrides(state)
  assert read["init_values"] == (2, 3, 2, 1) and read["heads_ranges"] == (4, 3, 6, 5)
  assert read["num_heads"] == (2, 2, 4, 4) and read["token_label"] is False
  state = dict(state)
  decay = state["layers.2.Relpos.decay"].copy()           # 4 heads: not a + r h / H any more
  decay[2] *= 1.1
  state["layers.2.Relpos.decay"] = decay
  with pytest.raises(ValueError, match=r"layers\.2\.Relpos\.decay"):
    convert.from_official(state, "rmt_t")


def test_cli_converts_an_official_checkpoint(tmp_path, capsys):
  state, data = load_fixture("hornet_t_gf")
  path = str(tmp_path / "hornet.npz")
  np.savez(path, **state)
  out = str(tmp_path / "out")
  rc = convert_cli.main(["--from=official", "--model=hornet_tiny_gf", f"--checkpoint={path}",
                         f"--out={out}"])
  assert rc == 0, capsys.readouterr().err
  params, meta = checkpoint.load_params(out)
  assert meta["model_name"] == "hornet_t_gf" and meta["model_overrides"]["base_dim"] == 8
  _, variables, _ = convert.from_official(state, "hornet_t_gf")
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params),
               variables["params"])
  rc = convert_cli.main(["--from=official", "--model=hornet_t", f"--checkpoint={path}.pth",
                         f"--out={out}"])
  assert rc == 2 and "is not a file" in capsys.readouterr().err
