"""`vitjax.evaluate` and `vitjax.predict`: checkpoints of runs and of converters, without training.

References are computed apart from the code under test: accuracies with numpy from model.apply, timm's
predictions with timm's own transform and model on the same files.
"""
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import vitjax
from vitjax import checkpoint
from vitjax import evaluate
from vitjax import predict
from vitjax import train
from vitjax.configs import lookupvit as lookupvit_config
from vitjax.configs import vit as vit_config
from vitjax.data import fashion_mnist
from vitjax.data import preprocess
from vitjax.data import pretrained
from vitjax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(depth=1, width=32, mlp_dim=64, num_heads=2)


class TinyBN(nn.Module):
  """A BatchNorm classifier: predict must pass its running statistics."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name="conv")(images)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(self.num_classes, name="head")(nn.relu(x).mean(axis=(1, 2)))


if "test_ep_bn_tiny" not in registry.MODELS:
  registry.register_model("test_ep_bn_tiny")(lambda num_classes=10, **_: TinyBN(num_classes))


def _vit_config(fmnist, **overrides):
  c = vit_config.get_config("runlocal")
  c.model = dict(TINY, pool="gap")
  c.data.source_dir, c.data.data_dir = fmnist.source_dir, fmnist.data_dir
  c.data.image_size = 16
  c.total_steps, c.batch_size, c.eval_batch_size = 4, 16, 32
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 4, 4
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def run(fmnist, tmp_path_factory):
  """A 4-step run of a tiny ViT on the shared Fashion-MNIST: (config, workdir, its last eval row)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _vit_config(fmnist)
  row = train.train_and_evaluate(config, workdir)
  return config, workdir, row


def _fmnist_pngs(fmnist, directory, n=3):
  images, labels = fmnist.arrays["test"]
  paths = []
  for i in range(n):
    path = os.path.join(directory, f"test{i}.png")
    Image.fromarray(images[i]).save(path)
    paths.append(path)
  return paths, images[:n], labels[:n]


def test_evaluate_reproduces_the_runs_last_accuracy(run):
  config, workdir, row = run
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in logged if "eval/accuracy" in r][-1]
  assert last["step"] == 4 and last["eval/accuracy"] == pytest.approx(row["eval/accuracy"])
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  got = evaluate.evaluate(config, workdir)
  assert got["eval/accuracy"] == pytest.approx(last["eval/accuracy"], abs=1e-6)
  assert got["eval/top5"] == pytest.approx(last["eval/top5"], abs=1e-6)
  assert got["eval/accuracy"] <= got["eval/top5"] <= 1.0
  # Nothing but the results line is written: no training checkpoint, no metrics line.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == len(logged)
  lines = [json.loads(l) for l in open(os.path.join(workdir, evaluate.OUT_FILE))]
  assert lines[-1]["step"] == 4 and lines[-1]["split"] == "test"
  assert lines[-1]["eval/accuracy"] == pytest.approx(got["eval/accuracy"])


def _accuracies(logits, labels):
  order = np.argsort(-logits, axis=-1)
  return float(np.mean(order[:, 0] == labels)), float(np.mean((order[:, :5] == labels[:, None]).any(-1)))


def test_evaluate_reports_every_lookupvit_grid(fmnist, tmp_path, capsys):
  """A parameter checkpoint (as a converter writes) evaluated at every config.eval_grids entry."""
  c = lookupvit_config.get_config("runlocal")
  c.model.update(TINY)
  c.data.source_dir, c.data.data_dir, c.data.image_size = fmnist.source_dir, fmnist.data_dir, 16
  c.grids, c.eval_grids, c.grid_weights = ((2, 2), (3, 3)), ((2, 2), (3, 3)), ()
  c.eval_batch_size = 16
  overrides = {k: v for k, v in c.model.to_dict().items() if v is not None}
  model = vitjax.create_model("lookupvit_nano4", num_classes=10, **overrides)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 16, 16, 1)), grid=(3, 3))
  params_dir = str(tmp_path / "params")
  checkpoint.save_params(params_dir, variables["params"], meta={
      "model_name": "lookupvit_nano4", "model_overrides": dict(overrides, num_classes=10)})
  row = evaluate.evaluate(c, params_dir)
  printed = capsys.readouterr().out
  images, labels = fmnist.arrays["test"]
  x = preprocess.preprocess_batch(images[..., None], image_size=16, channels=0, augment=False)
  for grid in ((2, 2), (3, 3)):
    name = f"@{grid[0]}x{grid[1]}"
    top1, top5 = _accuracies(np.asarray(model.apply(variables, x, grid=grid)), labels)
    assert row[f"eval/accuracy{name}"] == pytest.approx(top1, abs=1e-6)
    assert row[f"eval/top5{name}"] == pytest.approx(top5, abs=1e-6)
    assert f"test{name}: top-1 {top1:.4f} | top-5 {top5:.4f}" in printed
  assert row["eval/accuracy"] == row["eval/accuracy@3x3"]  # the headline is the largest grid


def test_evaluate_applies_a_converted_checkpoints_mean_and_std(fmnist, tmp_path):
  """Weights converted with other input statistics (timm's ImageNet mean/std) are fed those."""
  c = _vit_config(fmnist)
  model = vitjax.create_model("vit_nano4", num_classes=10, **c.model.to_dict())
  variables = model.init(jax.random.key(5), jnp.zeros((1, 16, 16, 1)))
  out = str(tmp_path / "converted")
  checkpoint.save_params(out, variables["params"], meta={
      "model_name": "vit_nano4", "model_overrides": dict(c.model.to_dict(), num_classes=10),
      "preprocess": {"mean": [0.3], "std": [0.2]}})
  row = evaluate.evaluate(c, out)
  images, labels = fmnist.arrays["test"]
  u = images[..., None].astype(np.float32) / 255.0  # 28 px; resized like the pipeline below
  x = preprocess.preprocess_batch(images[..., None], image_size=16, channels=0, augment=False)
  np.testing.assert_allclose((x + 1) / 2, preprocess.resize(u, (16, 16)), atol=1e-5)
  logits = np.asarray(model.apply(variables, ((x + 1) / 2 - 0.3) / 0.2))
  top1, top5 = _accuracies(logits, labels)
  assert row["eval/accuracy"] == pytest.approx(top1, abs=1e-6)
  assert row["eval/top5"] == pytest.approx(top5, abs=1e-6)


def test_predict_uses_the_runs_pipeline_and_class_names(run, fmnist, tmp_path):
  config, workdir, _ = run
  paths, images, _ = _fmnist_pngs(fmnist, str(tmp_path))
  got = predict.predict(workdir, paths)
  variables, _ = checkpoint.read_for_inference(workdir)
  model = vitjax.create_model("vit_nano4", num_classes=10, **config.model.to_dict())
  x = preprocess.preprocess_batch(images[..., None], image_size=16, channels=0, augment=False)
  probs = np.asarray(jax.nn.softmax(model.apply(variables, x), -1))
  for p, preds in zip(probs, got):
    order = np.argsort(-p)[:5]
    assert [name for name, _ in preds] == [fashion_mnist.CLASS_NAMES[i] for i in order]
    np.testing.assert_allclose([q for _, q in preds], p[order], rtol=1e-5, atol=1e-6)


def test_predict_passes_batchnorm_statistics(tmp_path):
  model = vitjax.create_model("test_ep_bn_tiny", num_classes=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # not the init values
  out = str(tmp_path / "bn")
  checkpoint.save_params(out, variables["params"], batch_stats=stats, meta={
      "model_name": "test_ep_bn_tiny", "model_overrides": {"num_classes": 4}, "image_size": [8, 8]})
  path = str(tmp_path / "x.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (11, 9, 3), np.uint8)).save(path)
  labels = tmp_path / "labels.txt"
  labels.write_text("a\nb\nc\nd\n")
  (got,) = predict.predict(out, [path], labels=str(labels), top=4)
  x = preprocess.preprocess_batch(np.asarray(Image.open(path))[None], image_size=8, channels=3,
                                  augment=False)
  p = np.asarray(jax.nn.softmax(model.apply({"params": variables["params"], "batch_stats": stats},
                                            x), -1))[0]
  assert [n for n, _ in got] == ["abcd"[i] for i in np.argsort(-p)]
  np.testing.assert_allclose([q for _, q in got], np.sort(p)[::-1], rtol=1e-5)


def _timm():
  from tests import torch_compat  # pylint: disable=g-import-not-at-top
  return torch_compat.import_timm()


def test_converted_timm_vit_predicts_timms_top5(tmp_path):
  timm = _timm()
  import torch  # pylint: disable=g-import-not-at-top
  from vitjax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tmodel = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32,
                             num_classes=1000).eval()
  with torch.no_grad():  # timm's init gives near-uniform logits: spread them so top-5 is clear
    tmodel.head.weight.mul_(40.0)
    tmodel.head.bias.normal_(0.0, 1.0)
  pth = str(tmp_path / "vit.pth")
  torch.save(tmodel.state_dict(), pth)
  out = str(tmp_path / "converted")
  assert convert_cli.main(["--from=timm", "--model=vit_tiny_patch16_224", f"--checkpoint={pth}",
                           f"--out={out}"]) == 0
  _, meta = checkpoint.load_variables(out)
  cfg = timm.data.resolve_data_config(model=tmodel)
  for key in ("mean", "std", "crop_pct", "interpolation", "crop_mode"):
    want = cfg[key]
    assert (tuple(meta["preprocess"][key]) if key in ("mean", "std") else
            meta["preprocess"][key]) == want, key
  # Files of several sizes, aspect ratios, formats and modes.
  rng = np.random.default_rng(0)
  files = []
  for i, (h, w, mode, ext) in enumerate([(50, 40, "RGB", "png"), (37, 61, "RGB", "jpg"),
                                         (45, 45, "L", "png"), (64, 48, "RGBA", "png")]):
    path = str(tmp_path / f"img{i}.{ext}")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(mode).save(path)
    files.append(path)
  got = predict.predict(out, files)
  transform = timm.data.create_transform(**dict(cfg, input_size=(3, 32, 32)))
  names = pretrained.imagenet_class_names()
  with torch.no_grad():
    for path, preds in zip(files, got):
      x = transform(Image.open(path).convert("RGB"))[None]
      p = torch.softmax(tmodel(x), -1)[0].numpy()
      order = np.argsort(-p)[:5]
      assert np.diff(-p[order]).min() > 1e-5  # no near-tie that rounding could reorder
      assert [n for n, _ in preds] == [names[i] for i in order], path
      np.testing.assert_allclose([q for _, q in preds], p[order], rtol=1e-4)


def test_shipped_tables_match_timm():
  timm = _timm()
  from experiments import pretrained_tables  # pylint: disable=g-import-not-at-top
  assert pretrained.imagenet_class_names() == tuple(pretrained_tables.imagenet_classes(timm))
  with open(pretrained.TIMM_PREPROCESS_FILE) as f:
    shipped = json.load(f)
  current = pretrained_tables.timm_preprocess(timm)
  for name, entry in current.items():  # families added later may not be in the file yet
    if name in shipped:
      assert shipped[name] == entry, name
  assert shipped["vit_base_patch16_224"]["mean"] == [0.5, 0.5, 0.5]


def _params_dir(tmp_path, name="p", meta=None, **model_fields):
  model = vitjax.create_model("vit_nano4", num_classes=10, **dict(TINY, **model_fields))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  out = str(tmp_path / name)
  checkpoint.save_params(out, params, meta=meta)
  return out


def test_bad_inputs_give_one_clear_message_and_write_nothing(run, fmnist, tmp_path):
  config, workdir, _ = run
  written = os.path.join(workdir, evaluate.OUT_FILE)
  n_lines = len(open(written).readlines()) if os.path.exists(written) else 0
  image = _fmnist_pngs(fmnist, str(tmp_path), n=1)[0][0]
  lookup = lookupvit_config.get_config("runlocal")
  lookup.data.data_dir = fmnist.data_dir
  cases = [
      (lambda: evaluate.evaluate(lookup, workdir),
       r"holds a 'vit_nano4' model, but config.model_name='lookupvit_nano4'; it is a checkpoint "
       r"for another model \(pass --config.model_name=vit_nano4"),
      (lambda: predict.predict(workdir, [image], model_name="vit_b16"),
       r"holds a 'vit_nano4' model, but --model='vit_b16'"),
      (lambda: predict.predict(_params_dir(tmp_path, "anon"), [image]),
       r"records no model name; pass --model=NAME"),
      (lambda: predict.predict(_params_dir(tmp_path, "deeper", meta={
          "model_name": "vit_nano4", "model_overrides": dict(TINY, depth=2, pool="tok"),
          "image_size": [16, 16]}), [image]),
       r"does not fit model_name='vit_nano4'"),
      (lambda: predict.predict(workdir, [image], labels=str(tmp_path / "nope.txt")),
       r"--labels='.*nope.txt' does not exist; expected a text file with one class name per line"),
      (lambda: predict.predict(workdir, [str(tmp_path / "missing.jpg"), os.path.join(
          workdir, "config.json")]),
       r"2 of 2 files cannot be classified: '.*missing.jpg' does not exist; '.*config.json' is "
       r"not an image"),
      (lambda: predict.predict(str(tmp_path / "nowhere"), [image]),
       r"--checkpoint='.*nowhere' does not exist"),
      (lambda: predict.predict(str(tmp_path), [image]),
       r"is neither a training run's workdir .* nor a parameter checkpoint"),
  ]
  (tmp_path / "nine.txt").write_text("\n".join(f"c{i}" for i in range(9)))
  cases.append((lambda: predict.predict(workdir, [image], labels=str(tmp_path / "nine.txt")),
                r"nine.txt' has 9 lines, but the checkpoint's head has 10 classes"))
  for fn, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      fn()
  n_after = len(open(written).readlines()) if os.path.exists(written) else 0
  assert n_after == n_lines


def test_command_lines(run, fmnist, tmp_path):
  """The two commands as a user types them: predict prints top-5 lines; an error is one line."""
  _, workdir, _ = run
  paths = _fmnist_pngs(fmnist, str(tmp_path), n=2)[0]
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "vitjax.predict", f"--checkpoint={workdir}", *paths],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0] == paths[0] and lines[6] == paths[1] and len(lines) == 12
  assert all(re.match(r"^ +[01]\.\d{4}  .+ \(\d\)$", l) for l in lines[1:6]), lines
  for line in out.stderr.splitlines():  # the runner's lines only
    assert line[:9].count(":") == 2 and line[8] == " ", line
  out = subprocess.run([sys.executable, "-m", "vitjax.evaluate", "--config=configs/lookupvit.py",
                        f"--checkpoint={workdir}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error: --checkpoint=") and "Traceback" not in out.stderr
