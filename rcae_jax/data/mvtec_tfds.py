"""MVTec-AD as a TensorFlow Datasets builder (manual download).

Only imported when TFDS is wanted: it imports tensorflow_datasets (and so
TensorFlow) at the top.

The examples come from the same code as the direct folder reader:
`folder.discover` lists the files and Pillow decodes them (`datasets.decode`),
so TFDS and the folder loaders see the same images, labels and masks.
Images are stored losslessly (PNG) at their original resolution, as 8-bit RGB;
masks as uint8 {0, 255} [H, W, 1], all zero for good images.

    from rcae_jax.data import mvtec_tfds
    builder = mvtec_tfds.build('/data/mvtec_ad', '~/tensorflow_datasets',
                               'bottle')
    ds = builder.as_dataset(split='train')
"""

from __future__ import annotations

import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from rcae_jax.data import decode, folder

CATEGORIES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut',
              'leather', 'metal_nut', 'pill', 'screw', 'tile', 'toothbrush',
              'transistor', 'wood', 'zipper')
LABELS = ('good', 'defective')

_DESCRIPTION = """\
MVTec AD: 15 categories of industrial objects and textures for unsupervised
anomaly detection. Training images are defect-free; test images are
defect-free or show one of several defect types, with pixel-precise
ground-truth masks for the defects.
"""

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised
         Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and
          Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}
"""


class MVTecAD(tfds.core.GeneratorBasedBuilder):
  """MVTec-AD, one config per category, from a manually downloaded copy."""

  name = 'mvtec_ad'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MVTec AD cannot be downloaded automatically: its licence (CC BY-NC-SA 4.0)
asks each user to accept it. Download it yourself from
https://www.mvtec.com/company/research/datasets/mvtec-ad , extract the
archive(s), and pass the extracted folder as the manual directory
(`--manual_dir` / `DownloadConfig(manual_dir=...)`), laid out so that
`<manual_dir>/<category>/train/good` exists, for example
`<manual_dir>/bottle/train/good/000.png`,
`<manual_dir>/bottle/test/broken_large/000.png` and
`<manual_dir>/bottle/ground_truth/broken_large/000_mask.png`.
"""
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=c, description=f'MVTec AD category {c}.')
      for c in CATEGORIES
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # The inherited lookup needs the `importlib_resources` backport on
    # Python >= 3.9 (TFDS 4.9 only requires it below 3.9); this file is the
    # answer it would compute.
    return epath.Path(os.path.abspath(__file__))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='png'),
            'mask': tfds.features.Image(shape=(None, None, 1),
                                        encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(LABELS)),
            'defect_type': tfds.features.Text(),
            'file_name': tfds.features.Text(),
        }),
        homepage='https://www.mvtec.com/company/research/datasets/mvtec-ad',
        citation=_CITATION,
        license='CC BY-NC-SA 4.0',
    )

  def _split_generators(self, dl_manager):
    files = folder.discover(os.fspath(dl_manager.manual_dir),
                            self.builder_config.name)
    missing = [e.path for e in files.test if e.label and e.mask_path is None]
    if missing:
      raise folder.DataError(
          f'{len(missing)} defective test image(s) of {files.category!r} have '
          f'no ground-truth mask, e.g. {missing[0]!r}: MVTec AD ships one '
          'per defective image (ground_truth/<defect>/<stem>_mask.png)')
    train = [folder.TestExample(p, 0, folder.GOOD, None) for p in files.train]
    return {
        'train': self._generate_examples(files, train),
        'test': self._generate_examples(files, list(files.test)),
    }

  def _generate_examples(self, files: folder.CategoryFiles, examples):
    cat_dir = os.path.join(files.root, files.category)
    for ex in examples:
      image, mask = decode_example(ex)
      name = os.path.relpath(ex.path, cat_dir).replace(os.sep, '/')
      yield name, {
          'image': image,
          'mask': mask,
          'label': ex.label,
          'defect_type': ex.defect_type,
          'file_name': name,
      }


def decode_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] at full resolution, decoded exactly as the loaders do."""
  return decode.load_image(path, None)


def decode_example(ex: folder.TestExample) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3], mask uint8 {0, 255} [H, W, 1])."""
  image = decode_image(ex.path)
  mask = decode.load_mask(ex.mask_path, image.shape[:2])
  return image, (mask.astype(np.uint8) * 255)[..., None]


def build(manual_dir: str, data_dir: str, category: str) -> MVTecAD:
  """Prepares `mvtec_ad/<category>` in `data_dir` (once) and returns it."""
  if category not in CATEGORIES:
    raise folder.DataError(f'unknown MVTec AD category {category!r}; the '
                           f'categories are: {", ".join(CATEGORIES)}')
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(os.path.join(manual_dir, category, 'train', 'good')):
    raise folder.DataError(
        f'{os.path.join(manual_dir, category, "train", "good")!r} is missing.'
        f'\n{MVTecAD.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  builder = MVTecAD(config=category,
                    data_dir=os.path.abspath(os.path.expanduser(data_dir)))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder

