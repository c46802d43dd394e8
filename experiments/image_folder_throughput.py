"""Build throughput of an image-folder dataset: the real Fashion-MNIST test set as PNG folders.

    python -m experiments.image_folder_throughput [--repeats=3] [--workdir=/tmp/image_folder_bench]

Exports the 10,000 test images (Debian's dataset-fashion-mnist IDX files) as
WORKDIR/fmnist_png/test/<class name>/<index>.png, then builds that folder with vitjax's image-folder
builder (`data.name='image_folder'`: list, decode every file to check it, write TFDS array_record
shards) into a fresh data_dir, `--repeats` times, and prints images/s for each build with the time the
check pass took. The export is not timed. Prints the load average before and after, since the machine
may be shared.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
from PIL import Image

from vitjax.data import fashion_mnist
from vitjax.data import image_folder


def export(directory: str) -> int:
  files = fashion_mnist.find_idx_files(fashion_mnist.SOURCE_DIRS[0])
  if not files:
    raise SystemExit(f"Fashion-MNIST IDX files not found in {fashion_mnist.SOURCE_DIRS[0]} "
                     "(apt-get install dataset-fashion-mnist)")
  images = fashion_mnist.read_idx(files["test", "images"])
  labels = fashion_mnist.read_idx(files["test", "labels"])
  for i, (image, label) in enumerate(zip(images, labels)):
    d = os.path.join(directory, "test", fashion_mnist.CLASS_NAMES[label].replace("/", "-"))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(image).save(os.path.join(d, f"{i:05d}.png"))
  return len(images)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="/tmp/image_folder_bench")
  args = parser.parse_args()
  folder = os.path.join(args.workdir, "fmnist_png")
  if not os.path.isdir(folder):
    t = time.time()
    n = export(folder)
    print(f"exported {n:,} PNGs to {folder} in {time.time() - t:.1f} s")
  print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
  rates = []
  for r in range(args.repeats):
    data_dir = os.path.join(args.workdir, f"tfds_{r}")
    shutil.rmtree(data_dir, ignore_errors=True)
    t = time.time()
    listing = image_folder.list_folder(folder)
    stats = image_folder.build(listing, data_dir)
    seconds = time.time() - t
    rates.append(stats["images"] / seconds)
    print(f"build {r + 1}: {stats['images']:,} images, {listing.num_images:,} listed, "
          f"{seconds:.2f} s ({rates[-1]:.0f} images/s; check pass {stats['check_seconds']:.2f} s), "
          f"stored shape {stats['shape']}")
    shutil.rmtree(data_dir, ignore_errors=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")
  print(f"median: {float(np.median(rates)):.0f} images/s")


if __name__ == "__main__":
  main()
