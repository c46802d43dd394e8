"""Where XLA:CPU loses to PyTorch on a ViT-B/16 block, piece by piece (the profile behind bench.py).

    python -m experiments.bench_parts            # ViT-B/16 shapes: batch 8, 197 tokens, width 768

Each row times one piece three ways on ONE pinned core with one thread per framework, as process
CPU time (robust to load from other processes), interleaved, median over repeats:
  * "plain jnp": the straightforward formulation vitjax used before the fixes;
  * "vitjax": the library function as it is now (vitjax.ops.attention, vitjax.models.layers);
  * "torch": the op timm calls (F.scaled_dot_product_attention, F.gelu, F.linear).
Prints a markdown table and writes it to --out (default experiments/bench_parts.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default=os.path.join(HERE, "bench_parts.md"))
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(HERE))
  from experiments import bench  # pylint: disable=g-import-not-at-top
  bench.pin_to_one_core()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from vitjax.models import layers  # pylint: disable=g-import-not-at-top
  from vitjax.ops import attention  # pylint: disable=g-import-not-at-top
  bench._import_timm()  # pylint: disable=protected-access  (same torch setup as bench.py)
  torch.set_num_threads(1)

  b, n, d, heads, f = 8, 197, 768, 12, 3072
  hd = d // heads
  rng = np.random.default_rng(0)
  arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  q, k, v = arr(b, n, heads, hd), arr(b, n, heads, hd), arr(b, n, heads, hd)
  x, w1, b1 = arr(b * n, d), arr(d, f) * 0.03, arr(f)
  w2, b2, h = arr(f, d) * 0.02, arr(d), arr(b * n, f)
  scale = hd ** -0.5

  def plain_attention(q, k, v):  # (B, T, H, d) einsums straight on the inputs
    logits = jnp.einsum("bthd,bshd->bhts", q * scale, k)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)

  def plain_mlp(x, w1, b1, w2, b2):
    return jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2

  mlp = layers.MlpBlock(f)
  mlp_params = {"params": {"Dense_0": {"kernel": w1, "bias": b1},
                           "Dense_1": {"kernel": w2, "bias": b2}}}
  t = {name: torch.from_numpy(a) for name, a in dict(q=q, k=k, v=v, x=x, h=h, b1=b1, b2=b2).items()}
  t["w1"], t["w2"] = torch.from_numpy(w1.T.copy()), torch.from_numpy(w2.T.copy())
  tq, tk, tv = (t[c].transpose(1, 2).contiguous() for c in "qkv")   # SDPA takes (B, H, T, d)
  rows = {
      "attention core softmax(qk^T)v, 8x12 heads, 197 tokens": (
          (plain_attention, (q, k, v)),
          (lambda q, k, v: attention.dot_product_attention(q, k, v, scale=scale), (q, k, v)),
          lambda: F.scaled_dot_product_attention(tq, tk, tv)),
      "exact GELU on 1576x3072": (
          (lambda h: jax.nn.gelu(h, approximate=False), (h,)), (layers.gelu, (h,)),
          lambda: F.gelu(t["h"])),
      "MLP 768->3072->768 on 1576 tokens": (
          (plain_mlp, (x, w1, b1, w2, b2)),
          (lambda x: mlp.apply(mlp_params, x), (x,)),
          lambda: F.linear(F.gelu(F.linear(t["x"], t["w1"], t["b1"])), t["w2"], t["b2"])),
  }
  compiled = {}
  for name, (plain, ours, _) in rows.items():
    compiled[name] = [(jax.jit(fn).lower(*a).compile(), a) for fn, a in (plain, ours)]
    ref, got = (np.asarray(c(*a)) for c, a in compiled[name])
    print(f"{name}: max |vitjax - plain| = {np.abs(got - ref).max():.1e}", flush=True)
  times = {name: ([], [], []) for name in rows}
  with torch.inference_mode():
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
      for name, (_, _, torch_fn) in rows.items():
        for i, (c, a) in enumerate(compiled[name]):
          t0 = time.process_time()
          jax.block_until_ready(c(*a))
          times[name][i].append(time.process_time() - t0)
        t0 = time.process_time()
        torch_fn()
        times[name][2].append(time.process_time() - t0)
  lines = ["| piece (ViT-B/16 shapes) | plain jnp ms | vitjax ms | torch ms | plain/vitjax |",
           "|---|---:|---:|---:|---:|"]
  for name, ts in times.items():
    p, o, tt = (1e3 * np.median(s[1:]) for s in ts)
    lines.append(f"| {name} | {p:.2f} | {o:.2f} | {tt:.2f} | {p / o:.2f}x |")
  lines += ["", f"One core, one thread each, process CPU time, median of {args.repeats}. "
            f"Load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())}. Command: "
            "`python -m experiments.bench_parts`"]
  text = "\n".join(lines) + "\n"
  with open(args.out, "w") as fh:
    fh.write(text)
  print(text)


if __name__ == "__main__":
  main()
