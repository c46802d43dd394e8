"""Input pipelines: TFDS array_record datasets read without TensorFlow and iterated with grain.

    info = vitjax.data.dataset_info(config.data)
    train = vitjax.data.train_iterator(config.data, batch_size=256, seed=0)
    batch = next(train)              # {'image': (256, S, S, C) float32 in [-1, 1],
                                     #  'label': (256,) int32}
    state = train.get_state()        # JSON-serialisable; train.set_state(state) resumes the stream
    for batch in vitjax.data.eval_iterator(config.data, batch_size=256):
      ...                            # plus 'mask': False on the padding of the last batch

config.data fields: name ('fashion_mnist' or any TFDS image-classification dataset prepared as
array_record under data_dir), data_dir ('' = TFDS's default), source_dir (where the Fashion-MNIST IDX
files are), image_size, train_split, eval_split, channels (0 keep, 1 grey, 3 RGB), augment ('none' or
'crop_flip').
"""
from vitjax.data.fashion_mnist import read_idx, write_idx  # noqa: F401
from vitjax.data.pipeline import DatasetInfo, dataset_info, eval_iterator, train_iterator  # noqa: F401
