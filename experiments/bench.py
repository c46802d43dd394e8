"""Benchmark: vitjax (JAX/XLA) against timm (PyTorch eager) on the same weights.

    python -m experiments.bench                      # vit_s16, vit_b16, convnext_tiny; batch 8, 224 px
    python -m experiments.bench --models=vit_s16 --repeats=5 --modes=infer

For each model, timm's randomly initialised weights are converted with `vitjax.convert.from_timm`,
so both frameworks compute the same function (the max logit difference is printed). Measured, in
ONE process and interleaved (vitjax step, timm step, vitjax step, ...) so that drift in machine
load hits both alike:
  * inference images/s: `model.apply(..., train=False)` jitted vs `torch.inference_mode()` eval;
  * train-step images/s: forward + softmax cross-entropy + backward + AdamW update (optax.adamw,
    jitted with donated state, vs torch.optim.AdamW), no dropout in either;
  * the median over repeats and the ratio vitjax/timm (> 1 means vitjax is faster);
  * peak memory: on a GPU the device allocators' peaks; on a CPU the peak resident set size of a
    separate process that runs only that framework's step (so it includes the runtime itself);
  * GMACs per image counted by XLA (`compiled.cost_analysis()['flops'] / 2`; GMACs =
    multiply-accumulates, the unit the ViT literature calls "GFLOPs"), and torch's
    FlopCounterMode count of the same forward as a cross-check.
Writes `bench.md` (the table), `bench.json` (raw times) and `bench.png` (bar plot) to --out_dir
(names from --name). `--single_core` pins both frameworks to one core and one thread and times
process CPU seconds instead: the comparison of the two runtimes' kernels that load from other
processes does not skew.
The device is picked automatically: JAX's default backend, and CUDA for torch when it has it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

MODELS = ("vit_s16", "vit_b16", "convnext_tiny")
MODES = ("infer", "train")
HERE = os.path.dirname(os.path.abspath(__file__))


def _import_timm():
  """timm needs torchvision; a CUDA torchvision wheel next to a CPU torch needs the test shim."""
  sys.path.insert(0, os.path.dirname(HERE))
  from tests import torch_compat  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    return torch_compat.import_timm()
  except pytest.skip.Exception as e:
    raise SystemExit(f"experiments.bench needs torch and timm: {e}") from e


class TimmSide:
  """The timm model, its inputs and optimizer on torch's device (CUDA when available)."""

  def __init__(self, name: str, batch: int, size: int, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    from vitjax.convert import timm as timm_convert  # pylint: disable=g-import-not-at-top
    timm = _import_timm()
    family, self.timm_name, _ = timm_convert.resolve(name)
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    # ViT and Swin are built for the input size (position table, window masks); ConvNeXt takes any.
    kwargs = {"img_size": size} if family.name in ("vit", "swin") else {}
    self.model = timm.create_model(self.timm_name, **kwargs).to(self.device)
    x, y = _batch(batch, size, seed)
    self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(self.device)
    self.y = torch.from_numpy(y).to(self.device)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

  def step(self, mode: str):
    import torch  # pylint: disable=g-import-not-at-top
    if mode == "infer":
      self.model.eval()
      with torch.inference_mode():
        self.model(self.x)
    else:
      self.model.train()
      self.opt.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(self.model(self.x), self.y).backward()
      self.opt.step()
    if self.device == "cuda":
      torch.cuda.synchronize()

  def logits(self) -> np.ndarray:
    import torch  # pylint: disable=g-import-not-at-top
    self.model.eval()
    with torch.inference_mode():
      return self.model(self.x).float().cpu().numpy()

  def gmacs_infer(self) -> float:
    """torch's FlopCounterMode count (matmuls and convs only) of one forward, per image."""
    import torch  # pylint: disable=g-import-not-at-top
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    counter = FlopCounterMode(display=False)
    self.model.eval()
    with torch.inference_mode(), counter:
      self.model(self.x)
    return counter.get_total_flops() / 2 / self.x.shape[0] / 1e9


class JaxSide:
  """The vitjax model with `params` (timm's, converted, or a fresh init) and its jitted steps."""

  def __init__(self, name: str, batch: int, size: int, params=None, seed: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    import vitjax  # pylint: disable=g-import-not-at-top
    model = self.model = vitjax.create_model(name)
    x, y = _batch(batch, size, seed)
    if params is None:
      params = jax.jit(model.init)(jax.random.key(seed), x[:1])["params"]
    self.params = jax.device_put(params)
    self.x, self.y = jax.device_put(x), jax.device_put(y)
    tx = optax.adamw(1e-4)
    self.opt_state = tx.init(self.params)

    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    infer = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    self.infer = infer.lower(self.params, self.x).compile()
    self.train = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        self.params, self.opt_state, self.x, self.y).compile()

  def step(self, mode: str):
    import jax  # pylint: disable=g-import-not-at-top
    if mode == "infer":
      jax.block_until_ready(self.infer(self.params, self.x))
    else:
      self.params, self.opt_state, loss = self.train(self.params, self.opt_state, self.x, self.y)
      jax.block_until_ready(loss)

  def logits(self) -> np.ndarray:
    return np.asarray(self.infer(self.params, self.x))

  def gmacs(self) -> dict[str, float]:
    """XLA's count per image: cost_analysis flops / 2 of the compiled inference and train step."""
    b = self.x.shape[0]
    return {m: c.cost_analysis()["flops"] / 2 / b / 1e9
            for m, c in (("infer", self.infer), ("train", self.train))}


def _batch(batch: int, size: int, seed: int):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, size, size, 3)).astype(np.float32),
          rng.integers(0, 1000, batch))


class Pair:
  """One model in both frameworks with the same weights (timm's init, converted)."""

  def __init__(self, name: str, batch: int, size: int, seed: int = 0):
    from vitjax import convert  # pylint: disable=g-import-not-at-top
    self.name = name
    self.timm = TimmSide(name, batch, size, seed)
    _, variables, _ = convert.from_timm(self.timm.model.state_dict(), self.timm.timm_name)
    self.jax = JaxSide(name, batch, size, variables["params"], seed)

  def max_logit_diff(self) -> float:
    return float(np.abs(self.jax.logits() - self.timm.logits()).max())


# Wall-clock by default; --single_core switches to process CPU time (set in main()).
_CLOCK = time.perf_counter


def _timed(fn) -> float:
  t = _CLOCK()
  fn()
  return _CLOCK() - t


def pin_to_one_core():
  """Restricts this process (and the thread pools JAX and torch create later) to one CPU core.

  With one core and one thread each, a step's process CPU time is its compute, whatever else the
  machine runs, so the two frameworks' kernels are compared free of scheduler effects (2-thread
  OpenMP code in particular slows down many-fold when another process takes one of its cores).
  """
  cpu = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cpu})
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  return cpu


def measure_speed(pairs, modes, repeats: int, warmup: int):
  """Interleaved timings: {(model, mode): {'vitjax': [s, ...], 'timm': [s, ...]}}."""
  times = {(p.name, m): {"vitjax": [], "timm": []} for p in pairs for m in modes}
  for p in pairs:
    for m in modes:
      for _ in range(warmup):
        p.jax.step(m)
        p.timm.step(m)
  for r in range(repeats):
    for p in pairs:
      for m in modes:
        # Alternate which framework goes first so neither always follows the other.
        order = (("vitjax", p.jax.step), ("timm", p.timm.step))
        for fw, step in (order if r % 2 == 0 else order[::-1]):
          times[(p.name, m)][fw].append(_timed(lambda: step(m)))  # pylint: disable=cell-var-from-loop
    print(f"  repeat {r + 1}/{repeats} done", flush=True)
  return times


def _peak_rss_reset() -> bool:
  """Resets the kernel's resident-set high-water mark (Linux); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mib() -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(framework: str, name: str, mode: str, batch: int, size: int):
  """Runs in a fresh process that builds only one framework; prints the peak memory as JSON.

  The peak covers the steps only (setup and compilation excluded where the kernel lets us reset
  the high-water mark): weights, optimizer state, activations and the runtime's resident pages.
  """
  side = JaxSide(name, batch, size) if framework == "vitjax" else TimmSide(name, batch, size)
  side.step(mode)
  reset = _peak_rss_reset()
  for _ in range(3):
    side.step(mode)
  out = {"peak_rss_mib": _peak_rss_mib(), "steps_only": reset}
  if framework == "timm" and side.device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
  if framework == "vitjax":
    import jax  # pylint: disable=g-import-not-at-top
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  print("MEMORY_JSON " + json.dumps(out))


def measure_memory(name: str, mode: str, batch: int, size: int) -> dict[str, dict]:
  out = {}
  for fw in ("vitjax", "timm"):
    cmd = [sys.executable, "-m", "experiments.bench", "--memory_child", f"{fw}:{name}:{mode}",
           f"--batch={batch}", f"--image_size={size}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE),
                         check=False)
    line = [l for l in res.stdout.splitlines() if l.startswith("MEMORY_JSON ")]
    out[fw] = json.loads(line[-1][len("MEMORY_JSON "):]) if line else {"error": res.stderr[-300:]}
  return out


def _mem_cell(m: dict) -> str:
  if "error" in m:
    return "n/a"
  key = "device_peak_mib" if "device_peak_mib" in m else "peak_rss_mib"
  return f"{m[key]:,.0f}"


def write_table(results, env: dict, path: str) -> str:
  mem_kind = "device peak MiB" if env["jax_backend"] != "cpu" else "peak RSS MiB"
  lines = [
      f"vitjax vs timm, batch {env['batch']}, {env['image_size']} px, float32, median of "
      f"{env['repeats']} interleaved repeats"
      + (", ONE core and one thread per framework, images per CPU-second of the process"
         if env["single_core"] else ", wall-clock") +
      f". Device: {env['device']} (load average "
      f"{env['load_before']} before, {env['load_after']} after). GMACs = multiply-accumulates "
      "per image (the ViT literature's \"GFLOPs\"): XLA's count of the compiled step, and torch's "
      "FlopCounterMode count (matmuls and convolutions only) of the forward. Peak memory: "
      + ("the device allocator's peak." if env["jax_backend"] != "cpu" else
         "the resident-set high-water mark of a separate process that builds only that framework "
         "and runs 3 steps (the mark is reset after the first step), so it includes the runtime."),
      "",
      f"| model | step | vitjax img/s | timm img/s | vitjax / timm | GMACs (XLA) | "
      f"GMACs (torch) | vitjax {mem_kind} | timm {mem_kind} |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
        f"| {r['model']} | {r['mode']} | {r['vitjax_ips']:.2f} | {r['timm_ips']:.2f} | "
        f"**{r['ratio']:.2f}x** | {r['gmacs']:.2f} | "
        f"{'-' if r['torch_gmacs'] is None else format(r['torch_gmacs'], '.2f')} | "
        f"{_mem_cell(r['memory']['vitjax']) if r['memory'] else 'n/a'} | "
        f"{_mem_cell(r['memory']['timm']) if r['memory'] else 'n/a'} |")
  lines += ["", f"Command: `{env['command']}`"]
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


def write_plot(results, env: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = [f"{r['model']}\n{r['mode']}" for r in results]
  pos = np.arange(len(results))
  fig, ax = plt.subplots(figsize=(1.9 * len(results) + 2, 4))
  a = ax.bar(pos - 0.2, [r["vitjax_ips"] for r in results], 0.4, label="vitjax (JAX/XLA)")
  ax.bar(pos + 0.2, [r["timm_ips"] for r in results], 0.4, label="timm (PyTorch eager)")
  for bar, r in zip(a, results):
    ax.annotate(f"{r['ratio']:.2f}x", (bar.get_x() + 0.4, max(r["vitjax_ips"], r["timm_ips"])),
                ha="center", va="bottom", fontsize=9)
  ax.set_xticks(pos, labels)
  ax.set_ylabel("images / s (higher is better)")
  clock = "1 core, CPU time" if env["single_core"] else "wall-clock"
  ax.set_title(f"vitjax vs timm: batch {env['batch']}, {env['image_size']} px, float32, {clock}, "
               f"on {env['device']} (load {env['load_before']})", fontsize=9)
  ax.margins(y=0.15)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory processes")
  parser.add_argument("--single_core", action="store_true",
                      help="pin to one core, one thread per framework, and time process CPU "
                      "seconds instead of wall-clock (robust to load from other processes)")
  parser.add_argument("--out_dir", default=HERE)
  parser.add_argument("--name", default="bench", help="output files NAME.md, NAME.json, NAME.png")
  parser.add_argument("--memory_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.memory_child:
    fw, name, mode = args.memory_child.split(":")
    return _memory_child(fw, name, mode, args.batch, args.image_size)
  global _CLOCK
  if args.single_core:
    pin_to_one_core()
    _CLOCK = time.process_time
  modes = [m for m in args.modes.split(",") if m]
  models = [m for m in args.models.split(",") if m]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f"Unknown --modes entry {m!r}. Allowed values: {', '.join(MODES)}.")

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if args.single_core:
    torch.set_num_threads(1)
  backend = jax.default_backend()
  dev = jax.devices()[0]
  device = (f"{dev.device_kind} ({backend})" if backend != "cpu" else
            f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
  load = lambda: "/".join(f"{v:.1f}" for v in os.getloadavg())  # noqa: E731
  env = {"load_before": load(), "single_core": args.single_core, "batch": args.batch, "image_size": args.image_size, "repeats": args.repeats,
         "device": device, "jax_backend": backend, "jax": jax.__version__,
         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "command": " ".join(["python -m experiments.bench"] + (sys.argv[1:] if argv is None
                                                                  else list(argv)))}
  print(f"{device}; jax {jax.__version__} ({backend}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)", flush=True)
  pairs = []
  for name in models:
    t = time.perf_counter()
    pairs.append(Pair(name, args.batch, args.image_size))
    print(f"{name}: built and compiled in {time.perf_counter() - t:.1f}s, max |logit diff| "
          f"= {pairs[-1].max_logit_diff():.2e}", flush=True)
  times = measure_speed(pairs, modes, args.repeats, args.warmup)
  env["load_after"] = load()
  results = []
  for p in pairs:
    g = {**p.jax.gmacs(), "torch_infer": p.timm.gmacs_infer()}
    for m in modes:
      tj, tt = np.median(times[(p.name, m)]["vitjax"]), np.median(times[(p.name, m)]["timm"])
      memory = None if args.no_memory else measure_memory(p.name, m, args.batch, args.image_size)
      results.append({"model": p.name, "mode": m, "vitjax_ips": args.batch / tj,
                      "timm_ips": args.batch / tt, "ratio": tt / tj, "gmacs": g[m],
                      "torch_gmacs": g["torch_infer"] if m == "infer" else None,
                      "memory": memory, "vitjax_s": times[(p.name, m)]["vitjax"],
                      "timm_s": times[(p.name, m)]["timm"]})
  os.makedirs(args.out_dir, exist_ok=True)
  out = os.path.join(args.out_dir, args.name)
  text = write_table(results, env, out + ".md")
  with open(out + ".json", "w") as f:
    json.dump({"env": env, "results": results}, f, indent=1)
  write_plot(results, env, out + ".png")
  print(text)


if __name__ == "__main__":
  main()
