"""Converts a local checkpoint file into a vitjax parameter checkpoint (Orbax + JSON meta).

    python -m vitjax.convert --from=timm --model=vit_base_patch16_224 \
        --checkpoint=vit_base_patch16_224.safetensors --out=vit_b16_timm
    python -m vitjax.main --config=configs/vit.py:imagenet --config.init_from=vit_b16_timm

--from=timm reads .pth/.pt/.bin (torch.load, weights_only) or .safetensors; --from=big_vision
reads .npz; --from=transformers reads a Hugging Face model's state dict (.bin/.safetensors/.pth, or
an .npz of arrays; `--model` is the vitjax name, e.g. cvt_13), converted by
`vitjax.convert.from_transformers`; --from=official reads the authors' own checkpoints
(.pth/.pt/.bin/.safetensors, or an .npz of arrays), converted by `vitjax.convert.from_official`:

    python -m vitjax.convert --from=official --model=hornet_t --checkpoint=hornet_tiny_7x7.pth \
        --out=hornet_t_official

Nothing is downloaded: fetch the file yourself.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from vitjax import choices

SOURCES = ("timm", "big_vision", "transformers", "official")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m vitjax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                      help="which library wrote the checkpoint")
  parser.add_argument("--model", required=True,
                      help="timm model name (e.g. vit_base_patch16_224) or vitjax name (vit_b16); "
                      "for --from=transformers a vitjax name (cvt_13) or a hub name (microsoft/cvt-13); "
                      "for --from=official a vitjax name (hornet_t) or the official constructor")
  parser.add_argument("--checkpoint", required=True, help="the local checkpoint file")
  parser.add_argument("--out", required=True, help="directory to write the vitjax checkpoint to")
  return parser.parse_args(argv)


def convert_file(source: str, model: str, checkpoint: str):
  """(source, model name, file) -> `Converted`; raises ValueError with the reason."""
  # Imported here so `--help` answers without loading JAX.
  from vitjax import convert  # pylint: disable=g-import-not-at-top
  choices.check("--from", source, SOURCES)
  if source == "big_vision":
    if not checkpoint.lower().endswith(".npz"):
      raise ValueError(f"--from=big_vision reads .npz files; got checkpoint={checkpoint!r}")
    return convert.from_big_vision_npz(checkpoint, model)
  if source == "official":
    return convert.from_official(convert.load_state_dict(checkpoint), model)
  if source == "transformers":
    return convert.from_transformers(convert.load_state_dict(checkpoint), model)
  if checkpoint.lower().endswith(".npz"):
    raise ValueError("--from=timm reads .pth/.pt/.bin/.safetensors files; for an .npz checkpoint "
                     "use --from=big_vision")
  return convert.from_timm(convert.load_state_dict(checkpoint), model)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    converted = convert_file(args.source, args.model, args.checkpoint)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from vitjax import checkpoint  # pylint: disable=g-import-not-at-top
  params = converted.variables["params"]
  checkpoint.save_params(args.out, params, meta=converted.meta,
                         batch_stats=converted.variables.get("batch_stats"))
  import jax  # pylint: disable=g-import-not-at-top
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  meta = converted.meta
  print(f"wrote {args.out}: vitjax {meta['model_name']} {meta['model_overrides']} at "
        f"{meta['image_size'][0]}x{meta['image_size'][1]} px, {count:,} parameters "
        f"(from {args.source} {meta['source_model']})")
  print(f"fine-tune with: --config.model_name={meta['model_name']} --config.init_from={args.out}")
  print(f"classify images with: python -m vitjax.predict --checkpoint={args.out} IMAGE...")
  print(f"evaluate with: python -m vitjax.evaluate --config=CONFIG --checkpoint={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
