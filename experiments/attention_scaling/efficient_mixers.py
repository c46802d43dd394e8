"""Every efficient token mixer of vitjax side by side: time and peak memory from 1k to 64k tokens.

    python -m experiments.attention_scaling.efficient_mixers [--sizes=1024,4096,16384,65536]
        [--mixers=exact,exact_chunked,krpe_fft,...] [--repeats=3]

Each mixer is the registered Linen module, built as a ViT block builds it (`build_mixer` with
width 384 and 6 heads), on batch 1 of N patch tokens laid out as a square grid (32², 64², 128²,
256²), float32, jit-compiled. Measured per mixer and N:

  * forward time and forward+backward time (gradient of sum(y²) with respect to the parameters
    and the input): the median of several runs after a warm-up. For each N, one process times all
    mixers, alternating run by run, so that every mixer sees the same background load;
  * peak memory, measured: each (mixer, N, mode) runs once in its own process, after compiling,
    and the peak is the rise of the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over its resident set just before the run. glibc is told to serve
    large blocks with mmap (MALLOC_MMAP_THRESHOLD_) so freed buffers leave the resident set;
  * the growth exponent: the least-squares slope of log(time) against log(N).

Exact softmax attention appears twice: the registered 'mhsa' mixer with the XLA core (all
(H, N, N) logits at once; not run where they would not fit this machine's memory), and the same
math in query blocks of 1024 rows, each block rematerialised in the backward pass
(memory O(block N), the FLOPs of exact attention): the reference the linear mixers are compared
with. The Pallas attention kernel runs on CPU only in interpret mode (a correctness tool), so it
is not timed here; it is a GPU/TPU path.

Writes efficient_mixers.json and efficient_mixers.md (the table) and efficient_mixers.png (log-log
plot) next to this file.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, HEADS = 384, 6
GiB = 2 ** 30


class ExactChunked(nn.Module):
  """softmax(q k^T / sqrt(d)) v in blocks of `block` query rows, each block rematerialised in
  the backward pass (so no (N, N) array is ever held), with the 'mhsa' mixer's projections."""
  num_heads: int = HEADS
  block: int = 1024

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    from vitjax.models import mixers  # pylint: disable=g-import-not-at-top
    init = nn.initializers.xavier_uniform()
    q, k, v = mixers.qkv_projections(x, self.num_heads, qkv_bias=True, kernel_init=init)
    b, n, h, d = q.shape
    block = min(self.block, n)

    @jax.checkpoint
    def rows(q_blk):                                                   # (B, block, H, d)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k) * d ** -0.5
      return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    blocks = q.reshape(b, n // block, block, h, d).swapaxes(0, 1)
    y = jax.lax.map(rows, blocks).swapaxes(0, 1).reshape(b, n, h, d)
    return mixers.out_projection(y, x.shape[-1], kernel_init=init, dropout=0.0, train=train)


class MHBC(nn.Module):
  """LookupViT's token mixing at a fixed compressed grid: the N lookup tokens are resized to
  `grid` compressed tokens, which gather from them (MHBC), attend to each other (full MHSA
  among the M compressed tokens) and propagate back (MHBC, the gather logits reused)."""
  num_heads: int = HEADS
  grid: tuple[int, int] = (7, 7)
  needs_grid = True

  @nn.compact
  def __call__(self, x, *, grid, num_prefix: int = 0, train: bool = False):
    from vitjax.models import lookupvit, mixers  # pylint: disable=g-import-not-at-top
    b, _, c = x.shape
    x_p = jax.image.resize(x.reshape(b, *grid, c), (b, *self.grid, c), "bilinear")
    x_p = x_p.reshape(b, -1, c)
    absorb = lookupvit.use_absorbed("auto", x_p.shape[1], x.shape[1], c, self.num_heads)
    y_p, logits = lookupvit.MHBCGather(self.num_heads, absorb=absorb, name="gather")(x_p, x)
    x_p = x_p + y_p
    x_p = x_p + mixers.MultiHeadSelfAttention(self.num_heads, name="compressed_attn")(x_p)
    return lookupvit.MHBCPropagate(self.num_heads, absorb=absorb, name="propagate")(logits, x_p)


class Entry(NamedTuple):
  label: str
  make: Callable[..., Any]         # grid -> the mixer module (or None when it is not available)
  max_tokens: int | None = None    # larger N are not run (why: `limit`)
  limit: str = ""


def _registered(name: str, **kwargs):
  """A registered mixer; a kwarg given as a function is evaluated on the grid."""
  def make(grid=(32, 32)):
    from vitjax.models import backbone, registry  # pylint: disable=g-import-not-at-top
    if name not in registry.list_mixers():
      return None
    fields = {k: v(grid) if callable(v) else v for k, v in kwargs.items()}
    return backbone.build_mixer(name, dict(num_heads=HEADS, attn_impl="xla"), fields)
  return make


def _class(cls):
  return lambda grid=(32, 32): cls()


def entries() -> dict[str, Entry]:
  dense_gib = lambda n: HEADS * n * n * 4 / GiB  # noqa: E731  (one (H, N, N) float32 array)
  return {e.label: e for e in (
      Entry("exact", _registered("mhsa"), 4096,
            f"dense (H, N, N) logits: {dense_gib(16384):.0f} GiB per array at 16k"),
      Entry("exact_chunked", _class(ExactChunked), 16384, "O(N²) time: minutes per step at 64k"),
      Entry("krpe_fft", _registered("krpe_fft")),
      Entry("spectral_gating", _registered("spectral_gating")),
      Entry("hyena_nd", _registered("hyena_nd")),
      # m = 8 x 8 landmarks at every N (the landmark stride grows with the grid): linear in N.
      Entry("soft_attn", _registered("soft_attn", sr_ratio=lambda grid: grid[0] // 8)),
      Entry("retention_chunkwise", _registered("retention", form="chunkwise")),
      Entry("retention_recurrent", _registered("retention", form="recurrent")),
      Entry("shiftadd_attn", _registered("shiftadd_attn")),
      Entry("mhbc_7x7", _class(MHBC)),
  )}


def _grid(n: int) -> tuple[int, int]:
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"token counts must be square grids; got N={n}")
  return side, side


def build(label: str, n: int):
  """(forward, forward+backward, params, x) for one mixer at N tokens; None if unavailable."""
  from vitjax.models import backbone  # pylint: disable=g-import-not-at-top
  grid = _grid(n)
  module = entries()[label].make(grid)
  if module is None:
    return None
  x = jax.random.normal(jax.random.key(0), (1, n, WIDTH), jnp.float32)
  tokens = backbone.Tokens(x, grid=grid)
  variables = module.init(jax.random.key(1), x, **(
      dict(grid=grid, num_prefix=0) if getattr(module, "needs_grid", False) else {}))

  def apply(variables, x):
    return backbone.call_mixer(module.bind(variables), x, tokens.replace(x=x), train=False)

  def loss(variables, x):
    return jnp.sum(jnp.square(apply(variables, x)))

  forward = jax.jit(apply)
  backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return forward, backward, variables, x


# ---------------------------------------------------------------------------------------------
# Peak memory: one process per (mixer, N, mode).

def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def measure_peak(label: str, n: int, mode: str) -> dict:
  built = build(label, n)
  if built is None:
    return {"error": "not registered"}
  forward, backward, variables, x = built
  fn = forward if mode == "forward" else backward
  compiled = fn.lower(variables, x).compile()
  jax.block_until_ready((variables, x))
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                            # resets VmHWM to the current RSS
  before = _rss_kib("VmRSS")
  start = time.perf_counter()
  jax.block_until_ready(compiled(variables, x))
  seconds = time.perf_counter() - start
  peak = _rss_kib("VmHWM") - before
  return {"peak_bytes": peak * 1024, "seconds_once": seconds}


def peak_in_subprocess(label: str, n: int, mode: str, timeout: float) -> dict:
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
  cmd = [sys.executable, "-m", "experiments.attention_scaling.efficient_mixers",
         "--_peak", f"{label},{n},{mode}"]
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"over {timeout:.0f} s"}
  if done.returncode:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
    return {"error": f"exit {done.returncode}: {tail[0][:120]}"}
  return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Times: one process per N, all mixers alternating.

def time_all(labels, n: int, repeats: int) -> dict:
  calls = {}
  for label in labels:
    built = build(label, n)
    if built is None:
      continue
    forward, backward, variables, x = built
    calls[(label, "forward")] = functools.partial(forward, variables, x)
    calls[(label, "backward")] = functools.partial(backward, variables, x)
  for fn in calls.values():
    jax.block_until_ready(fn())                              # compile + warm-up
  times = {key: [] for key in calls}
  for _ in range(repeats):
    for key, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - start)
  return {f"{label}|{mode}": statistics.median(t) for (label, mode), t in times.items()}


def times_in_subprocess(labels, n: int, repeats: int) -> dict:
  cmd = [sys.executable, "-m", "experiments.attention_scaling.efficient_mixers",
         "--_times", f"{n},{repeats}," + ":".join(labels)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"timing at N={n} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(ns, ts) -> float | None:
  pts = [(math.log(n), math.log(t)) for n, t in zip(ns, ts) if t is not None]
  if len(pts) < 2:
    return None
  return float(np.polyfit(*zip(*pts), 1)[0])


# ---------------------------------------------------------------------------------------------
# Report.

def _fmt_s(t):
  return "—" if t is None else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def _fmt_mem(m):
  if m is None:
    return "—"
  if "error" in m:
    return f"failed ({m['error']})"
  return f"{m['peak_bytes'] / GiB:.2f} GiB" if m["peak_bytes"] >= GiB / 4 else (
      f"{m['peak_bytes'] / 2 ** 20:.0f} MiB")


def summarize(results: dict) -> dict:
  """Per mixer: exponents, the 16k/4k ratios, the speed-up over exact attention at 16k and the
  targets (ratio <= 5, >= 5x faster than exact at 16k, < 8 GiB at 64k)."""
  ns = results["sizes"]
  ref = results["reference"]
  out = {}
  for label in results["mixers"]:
    row = {}
    for mode in ("forward", "backward"):
      ts = [results["times"].get(str(n), {}).get(f"{label}|{mode}") for n in ns]
      row[f"exponent_{mode}"] = exponent(ns, ts)
      t = dict(zip(ns, ts))
      row[f"ratio_16k_4k_{mode}"] = (t[16384] / t[4096] if t.get(16384) and t.get(4096)
                                     else None)
      t_ref = results["times"].get("16384", {}).get(f"{ref}|{mode}")
      row[f"speedup_16k_{mode}"] = t_ref / t[16384] if t_ref and t.get(16384) else None
    mem = results["peaks"].get(f"{label}|65536|backward")
    row["peak_64k_backward_gib"] = (mem["peak_bytes"] / GiB if mem and "peak_bytes" in mem
                                    else None)
    out[label] = row
  return out


def markdown(results: dict) -> str:
  ns, labels = results["sizes"], results["mixers"]
  summary = summarize(results)
  k = lambda n: f"{n // 1024}k"  # noqa: E731
  lines = [
      f"Batch 1, width {WIDTH}, {HEADS} heads, N tokens on a square grid, float32, jit; median of "
      f"{results['repeats']} runs after a warm-up, all mixers alternating in one process per N; "
      f"peak = measured rise of the resident-set high-water mark during one run (own process). "
      f"jax {results['jax']}, {results['platform']}; 1-min load average before / after: "
      f"{results['load_before']:.1f} / {results['load_after']:.1f}.", "",
      "| mixer | " + " | ".join(f"fwd {k(n)}" for n in ns) + " | "
      + " | ".join(f"fwd+bwd {k(n)}" for n in ns) + " | "
      + " | ".join(f"peak fwd+bwd {k(n)}" for n in ns) + " | exponent fwd / fwd+bwd |",
      "|---|" + "---:|" * (3 * len(ns) + 1)]
  for label in labels:
    times = [results["times"].get(str(n), {}) for n in ns]
    cells = [_fmt_s(t.get(f"{label}|forward")) for t in times]
    cells += [_fmt_s(t.get(f"{label}|backward")) for t in times]
    cells += [_fmt_mem(results["peaks"].get(f"{label}|{n}|backward")) for n in ns]
    s = summary[label]
    exps = " / ".join("—" if s[f"exponent_{m}"] is None else f"{s[f'exponent_{m}']:.2f}"
                      for m in ("forward", "backward"))
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {exps} |")
  lines += ["", f"Targets (reference: {results['reference']}): 16k/4k time ratio <= 5; at 16k at "
            "least 5x faster than exact attention; 64k forward+backward in under 8 GiB.", "",
            "| mixer | 16k/4k fwd | 16k/4k fwd+bwd | speed-up at 16k fwd | fwd+bwd | peak at 64k "
            "(fwd+bwd) | all met |", "|---|---:|---:|---:|---:|---:|---|"]
  for label in labels:
    s = summary[label]
    f = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    met = (s["ratio_16k_4k_forward"] is not None and s["ratio_16k_4k_forward"] <= 5
           and s["ratio_16k_4k_backward"] <= 5 and (s["speedup_16k_forward"] or 0) >= 5
           and (s["speedup_16k_backward"] or 0) >= 5
           and s["peak_64k_backward_gib"] is not None and s["peak_64k_backward_gib"] < 8)
    lines.append(
        f"| {label} | {f(s['ratio_16k_4k_forward'], '.1f')} | "
        f"{f(s['ratio_16k_4k_backward'], '.1f')} | {f(s['speedup_16k_forward'], '.1f')}x | "
        f"{f(s['speedup_16k_backward'], '.1f')}x | {f(s['peak_64k_backward_gib'], '.2f')} GiB | "
        f"{'yes' if met else 'no'} |")
  limits = [f"{e.label}: not run above {k(e.max_tokens)} ({e.limit})"
            for e in entries().values() if e.label in labels and e.max_tokens]
  return "\n".join(lines + [""] + limits) + "\n"


def plot(results: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ns = results["sizes"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, mode, title in zip(axes, ("forward", "backward"), ("forward", "forward + backward")):
    for i, label in enumerate(results["mixers"]):
      pts = [(n, results["times"].get(str(n), {}).get(f"{label}|{mode}")) for n in ns]
      pts = [(n, t) for n, t in pts if t is not None]
      if pts:
        style = "s-" if label.startswith("exact") else "o-"
        ax.loglog(*zip(*pts), style, label=label, color=f"C{i % 10}")
    ax.set_title(f"{title}, batch 1, width {WIDTH}, {HEADS} heads", fontsize=9)
    ax.set_xlabel("tokens N")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("seconds (median)")
  axes[1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1024,4096,16384,65536")
  parser.add_argument("--mixers", default=",".join(entries()))
  parser.add_argument("--reference", default="exact_chunked")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak_timeout", type=float, default=900)
  parser.add_argument("--out", default=os.path.join(HERE, "efficient_mixers"))
  parser.add_argument("--_peak", help=argparse.SUPPRESS)
  parser.add_argument("--_times", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._peak:                                   # pylint: disable=protected-access
    label, n, mode = args._peak.split(",")         # pylint: disable=protected-access
    print(json.dumps(measure_peak(label, int(n), mode)))
    return
  if args._times:                                  # pylint: disable=protected-access
    n, repeats, labels = args._times.split(",", 2)  # pylint: disable=protected-access
    print(json.dumps(time_all(labels.split(":"), int(n), int(repeats))))
    return

  known = entries()
  labels = [m for m in args.mixers.split(",") if m]
  for m in labels:
    if m not in known:
      raise SystemExit(f"unknown mixer {m!r}; known: {', '.join(known)}")
  missing = [m for m in labels if known[m].make() is None]
  if missing:
    print(f"not registered in this checkout, left out: {', '.join(missing)}", flush=True)
  labels = [m for m in labels if m not in missing]
  sizes = sorted(int(s) for s in args.sizes.split(",") if s)
  results = {"sizes": sizes, "mixers": labels, "reference": args.reference,
             "repeats": args.repeats, "jax": jax.__version__,
             "platform": f"{jax.devices()[0].platform}, {os.cpu_count()} cores, "
                         f"{platform.machine()}",
             "load_before": os.getloadavg()[0], "times": {}, "peaks": {}}
  for n in sizes:
    run = [m for m in labels if not known[m].max_tokens or n <= known[m].max_tokens]
    start = time.time()
    results["times"][str(n)] = times_in_subprocess(run, n, args.repeats)
    print(f"N={n}: timed {len(run)} mixers in {time.time() - start:.0f} s: "
          + ", ".join(f"{k} {_fmt_s(v)}" for k, v in results["times"][str(n)].items()),
          flush=True)
    for m in run:
      for mode in ("forward", "backward"):
        peak = peak_in_subprocess(m, n, mode, args.peak_timeout)
        results["peaks"][f"{m}|{n}|{mode}"] = peak
        print(f"  peak {m} N={n} {mode}: {_fmt_mem(peak)}", flush=True)
  results["load_after"] = os.getloadavg()[0]
  with open(args.out + ".json", "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  with open(args.out + ".md", "w") as f:
    f.write(table)
  plot(results, args.out + ".png")
  print(table)


if __name__ == "__main__":
  main()
