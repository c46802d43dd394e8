"""Image folders as datasets, DIR/<split>/<class>/<image>, built without TensorFlow.

Most users keep their images as a folder per class, which timm reads directly; TFDS's own folder
builder needs TensorFlow. With `config.data.name='image_folder'` and `config.data.folder=DIR`, the
folder is scanned on first use, every image is decoded once to check it, and the result is written as
a TFDS dataset (array_record shards, dataset_info.json) under `data.data_dir`:

    <data_dir>/image_folder_<folder name>/<fingerprint>/1.0.0/

From then on it is a prepared dataset like any other: later runs open it without decoding anything,
the same grain pipeline reads it, and `tfds.data_source('image_folder_<name>/<fingerprint>',
data_dir=...)` reads it too. The fingerprint hashes the listing (path, size and mtime of every image),
so a folder whose files changed is built again as a new dataset rather than read stale.

Rules, all checked before anything is written:
  * splits are DIR's subfolders (hidden ones ignored), named as TFDS splits are: a letter, then
    letters, digits or '_' ('all' is reserved). A split without its own folder is carved from another
    with TFDS slicing in the config: data.train_split='train[:90%]', data.eval_split='train[90%:]'.
    Records are shuffled when written (TFDS keys them by path), so a slice samples every class.
  * class names are the class folder names of all splits, sorted (torchvision's and timm's
    ImageFolder order); they are written into the dataset info as its ClassLabel.
  * images are the files ending in .jpg, .jpeg, .png or .webp (any case) anywhere under a class
    folder; other files are skipped and counted in the build's log line.
  * the stored channel count is 1 when every image is grey, else 3. Images in another mode (RGBA,
    palette, CMYK, 16-bit, a grey image among colour ones) are re-encoded losslessly as PNG in the
    stored mode so TFDS's own decoder returns what the feature declares; the rest keep their bytes.
    `data.channels` converts at read time as for any dataset.
  * an image that does not decode is an error listing how many and which, unless
    data.skip_corrupt=True; then they are left out and every run that reads the dataset logs how
    many were skipped (they are listed in SKIPPED_FILE next to the dataset).
The build writes into a temporary directory under data_dir and renames the finished version folder
into place, so an error, or a killed process, leaves no partial dataset behind.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time

from PIL import Image
import tensorflow_datasets as tfds

from vitjax import console

NAME = "image_folder"             # the value of data.name
VERSION = "1.0.0"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SKIPPED_FILE = "vitjax_skipped.json"  # corrupt files left out by data.skip_corrupt=True
# PIL modes that hold one intensity per pixel.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# How many bad paths an error message lists before saying how many more there are.
SHOW_PATHS = 20
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_FINGERPRINT_FORMAT = "1"  # bump when what a build writes changes
_prepared: dict[tuple[str, str], dict] = {}  # (folder, data_dir) -> what ensure_prepared found


@dataclasses.dataclass(frozen=True)
class Listing:
  """What a folder holds, from file names and stat() alone (nothing decoded)."""
  folder: str
  class_names: tuple[str, ...]
  files: dict[str, list[tuple[str, int]]]  # split -> [(path relative to folder, label)]
  ignored: int                             # files that are not images by their extension
  fingerprint: str

  @property
  def num_images(self) -> int:
    return sum(len(v) for v in self.files.values())


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _layout_error(folder: str, detail: str) -> ValueError:
  return ValueError(f"data.folder={folder!r}: {detail}. Expected DIR/<split>/<class>/<image>, "
                    "e.g. DIR/train/cat/001.jpg and DIR/val/cat/101.jpg.")


def list_folder(folder: str) -> Listing:
  """Lists DIR/<split>/<class>/... (one stat() per file); one clear error for a bad layout."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise _layout_error(folder, "does not exist" if not os.path.exists(folder)
                        else "is a file, not a directory")
  splits = _subdirs(folder)
  if not splits:
    raise _layout_error(folder, "has no split folders")
  bad = [s for s in splits if not _SPLIT_RE.match(s) or s.lower() == "all"]
  if bad:
    raise _layout_error(folder, f"split folder names {bad} are not TFDS split names (a letter, then "
                        "letters, digits or '_'; 'all' is reserved); rename them")
  classes_of = {}
  for split in splits:
    path = os.path.join(folder, split)
    classes_of[split] = _subdirs(path)
    if not classes_of[split]:
      loose = [n for n in os.listdir(path) if _is_image(n)]
      hint = (f"; it holds images directly, which looks like DIR/<class>/<image>: move the class "
              f"folders into {os.path.join(folder, 'train')}/" if loose else "")
      raise _layout_error(folder, f"split folder {path!r} has no class subfolders{hint}")
  class_names = tuple(sorted({c for cs in classes_of.values() for c in cs}))
  label_of = {c: i for i, c in enumerate(class_names)}
  files, ignored, digest = {}, 0, hashlib.sha256(_FINGERPRINT_FORMAT.encode())
  digest.update("\0".join(class_names).encode())
  for split in splits:
    files[split] = []
    for cls in classes_of[split]:
      top = os.path.join(folder, split, cls)
      for root, dirs, names in os.walk(top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
          if name.startswith("."):
            continue
          if not _is_image(name):
            ignored += 1
            continue
          path = os.path.join(root, name)
          st = os.stat(path)
          rel = os.path.relpath(path, folder)
          files[split].append((rel, label_of[cls]))
          digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return Listing(folder, class_names, files, ignored, digest.hexdigest()[:12])


def dataset_name(listing: Listing) -> str:
  """'image_folder_<folder name>/<fingerprint>': the TFDS name (dataset/config) of a build."""
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(listing.folder).lower()).strip("_") or "data"
  return f"{NAME}_{slug}/{listing.fingerprint}"


@dataclasses.dataclass(frozen=True)
class _Checked:
  mode: str | None          # PIL mode as stored in the file; None when it did not decode
  size: tuple[int, int]     # (width, height)
  error: str = ""


def check_image(path: str) -> _Checked:
  """Decodes one file fully (JPEGs at 1/8 scale, which still reads every byte of the stream)."""
  try:
    with Image.open(path) as img:
      mode, size = img.mode, img.size
      if img.format == "JPEG":
        img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
      img.load()
    return _Checked(mode, size)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types for bad files)
    return _Checked(None, (0, 0), f"{type(e).__name__}: {e}")


def corrupt_error(folder: str, bad: list[str], total: int) -> ValueError:
  shown = "\n  ".join(bad[:SHOW_PATHS]) + (f"\n  ... and {len(bad) - SHOW_PATHS} more"
                                           if len(bad) > SHOW_PATHS else "")
  return ValueError(f"data.folder={folder!r}: {len(bad)} of {total} image files cannot be read "
                    f"(corrupt, truncated or not images):\n  {shown}\nFix or remove them, or set "
                    "data.skip_corrupt=True to train without them.")


def _builder(listing: Listing, class_names, shape, examples: dict, recode: set):
  """A TFDS builder that writes `examples` (split -> [(relpath, label)]) as array_record."""
  builder_name, config_name = dataset_name(listing).split("/")
  folder = listing.folder

  def encoded(rel: str) -> bytes:
    path = os.path.join(folder, rel)
    if rel not in recode:
      with open(path, "rb") as f:
        return f.read()
    with Image.open(path) as img:
      img = img.convert("L" if shape[-1] == 1 else "RGB")
      buffer = io.BytesIO()
      img.save(buffer, format="png")
    return buffer.getvalue()

  class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version(globals()["VERSION"])
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name)]
    code_path = None  # see VitjaxFashionMnist.code_path

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Image folder {folder} (DIR/<split>/<class>/<image>), built by vitjax.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=shape),
              "label": tfds.features.ClassLabel(names=class_names),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(items) for split, items in examples.items()}

    def _generate_examples(self, items):
      for rel, label in items:
        yield rel, {"image": encoded(rel), "label": label}

  return ImageFolderBuilder


def build(listing: Listing, data_dir: str, *, skip_corrupt: bool = False,
          workers: int | None = None) -> dict:
  """Checks every image of `listing` and writes the dataset under data_dir; returns build stats.

  Raises:
    ValueError: listing every file that does not decode (unless skip_corrupt); nothing is written.
  """
  t0 = time.time()
  all_files = [(split, rel, label) for split, items in listing.files.items() for rel, label in items]
  paths = [os.path.join(listing.folder, rel) for _, rel, _ in all_files]
  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    checked = list(pool.map(check_image, paths, chunksize=64))  # PIL decodes without the GIL
  t_check = time.time() - t0
  bad = [p for p, c in zip(paths, checked) if c.mode is None]
  if bad and not skip_corrupt:
    raise corrupt_error(listing.folder, bad, len(paths))
  good = [(f, c) for f, c in zip(all_files, checked) if c.mode is not None]
  if not good:
    raise ValueError(f"data.folder={listing.folder!r} holds no readable "
                     f"{'/'.join(IMAGE_EXTENSIONS)} images.")
  channels = 1 if all(c.mode in GREY_MODES for _, c in good) else 3
  stored_mode = "L" if channels == 1 else "RGB"
  recode = {rel for (_, rel, _), c in good if c.mode != stored_mode}
  sizes = {c.size for _, c in good}
  shape = ((next(iter(sizes))[1], next(iter(sizes))[0], channels) if len(sizes) == 1
           else (None, None, channels))
  examples = {split: [] for split in listing.files}
  for (split, rel, label), _ in good:
    examples[split].append((rel, label))
  skipped = [os.path.relpath(p, listing.folder) for p in bad]
  _write(listing, data_dir, _builder(listing, listing.class_names, shape, examples, recode), skipped)
  seconds = time.time() - t0
  return dict(images=len(good), skipped=len(skipped), recoded=len(recode), ignored=listing.ignored,
              classes=len(listing.class_names), shape=shape, check_seconds=t_check,
              seconds=seconds, images_per_sec=len(good) / max(seconds, 1e-9))


def _write(listing: Listing, data_dir: str, builder_cls, skipped: list[str]):
  """Builds in a temporary directory under data_dir, then renames the version folder into place."""
  name = dataset_name(listing)
  final = os.path.join(data_dir, name, VERSION)
  made_data_dir = not os.path.exists(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".image_folder_build-", dir=data_dir)
  try:
    builder = builder_cls(data_dir=tmp, file_format="array_record")
    with console.library_output():
      builder.download_and_prepare()
    built = os.path.join(tmp, name, VERSION)
    with open(os.path.join(built, SKIPPED_FILE), "w") as f:
      json.dump({"folder": listing.folder, "skipped": skipped}, f, indent=1)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
      os.rename(built, final)
    except OSError:
      if not os.path.exists(os.path.join(final, "dataset_info.json")):
        raise  # else another process (multi-host, shared disk) finished the same build first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for path in (os.path.dirname(final), os.path.dirname(os.path.dirname(final))):
      with contextlib.suppress(OSError):
        os.rmdir(path)  # only if empty
    if made_data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
    raise
  shutil.rmtree(tmp, ignore_errors=True)


def _split_bases(split: str) -> list[str]:
  """'train[:90%]+val' -> ['train', 'val']: the split names a TFDS split expression reads."""
  return [part.split("[", 1)[0].strip() for part in split.split("+")]


def check_splits(folder: str, have: list[str], splits: dict[str, str]):
  """Each requested split (config field -> TFDS split string) must name one of the split folders."""
  for field, split in splits.items():
    for base in _split_bases(split):
      if base not in have:
        raise ValueError(
            f"{field}={split!r} reads split {base!r}, but data.folder={folder!r} has no folder "
            f"{os.path.join(folder, base)!r}; its split folders are {have}. Carve one from another "
            f"split with TFDS slicing, e.g. data.train_split='{have[0]}[:90%]' and "
            f"data.eval_split='{have[0]}[90%:]'.")


def ensure_prepared(folder: str, data_dir: str, *, skip_corrupt: bool = False,
                    splits: dict[str, str] | None = None) -> str:
  """Builds the folder into data_dir unless that build exists; returns its TFDS dataset name.

  Args:
    folder: data.folder.
    data_dir: the resolved data.data_dir.
    skip_corrupt: data.skip_corrupt.
    splits: config field -> split string ({'data.train_split': 'train[:90%]', ...}); each must
      read split folders that exist, checked before anything is built.

  The folder is listed once per process (a run opens its dataset several times); a folder changed
  while a run reads it is picked up by the next run.
  """
  key = (os.path.abspath(os.path.expanduser(folder)), os.path.abspath(data_dir))
  if key not in _prepared:
    listing = list_folder(folder)
    check_splits(listing.folder, sorted(listing.files), splits or {})
    name = dataset_name(listing)
    version_dir = os.path.join(data_dir, name, VERSION)
    if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
      split_counts = ", ".join(f"{s} {len(v):,}" for s, v in listing.files.items())
      console.log("image folder %s: %s images in %d classes (%s); checking each and building %s "
                  "in %s", listing.folder, f"{listing.num_images:,}", len(listing.class_names),
                  split_counts, name, data_dir)
      stats = build(listing, data_dir, skip_corrupt=skip_corrupt)
      console.log("built %s: %s images in %.1f s (%.0f images/s)%s%s", name, f"{stats['images']:,}",
                  stats["seconds"], stats["images_per_sec"],
                  f"; {stats['ignored']} files without an image extension ignored"
                  if stats["ignored"] else "",
                  f"; {stats['recoded']} re-encoded as PNG" if stats["recoded"] else "")
    skipped = []
    if os.path.exists(os.path.join(version_dir, SKIPPED_FILE)):
      with open(os.path.join(version_dir, SKIPPED_FILE)) as f:
        skipped = json.load(f)["skipped"]
    _prepared[key] = dict(name=name, skipped=skipped, splits=sorted(listing.files),
                          total=listing.num_images, logged=False)
  entry = _prepared[key]
  check_splits(key[0], entry["splits"], splits or {})
  if entry["skipped"]:
    if not skip_corrupt:
      raise corrupt_error(key[0], [os.path.join(key[0], p) for p in entry["skipped"]],
                          entry["total"])
    if not entry["logged"]:
      console.log("data.skip_corrupt=True: %d corrupt image files left out (listed in %s)",
                  len(entry["skipped"]),
                  os.path.join(data_dir, entry["name"], VERSION, SKIPPED_FILE))
      entry["logged"] = True
  return entry["name"]


def forget():
  """Forgets which folders this process has listed (tests change folders between builds)."""
  _prepared.clear()
