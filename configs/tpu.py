"""Paper-sized RcAE on MVTec-AD, for a Cloud TPU VM (or a multi-GPU host).

Command (from the repository root of a machine with gcloud; creates a TPU VM,
installs, trains all three stages, evaluates, deletes the VM):

    PROJECT=my-project ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-8 \
    TPU_NAME=rcae-v5e WORKDIR=gs://my-bucket/rcae/bottle launch/tpu_run.sh

Add `DATA_URL=gs://my-bucket/mvtec_ad` to copy the data to every worker (it
then becomes data.root), `SPOT=1` for a Spot VM, `--dry-run` to see every
command first; rerunning with the same WORKDIR resumes from its latest
checkpoint. docs/tpu.md has the details (pod slices, costs, multi-GPU).
Directly on a machine that already has the code and data:

    python -m rcae_jax.main --config configs/tpu.py --workdir DIR \
      --config.data.root=/path/to/mvtec_ad --config.data.category=bottle

What the paper fixes (docs/method.md,
**P**): input 1024 x 1024, N = 5, Adam with learning rate 1e-4, 1500 / 400 /
300 epochs for stages 1 / 2 / 3.
Widths, residual blocks and the batch size are ours (see
docs/method.md).

Epochs -> steps. Each stage sets `epochs` (the paper's number); when the
data is read, run.prepare turns it into that many passes over the
category's real training set at the stage's own batch size, steps =
ceil(epochs * images / batch size) (MVTec-AD: bottle 209 good train
images, screw 320, toothbrush 60, less the data.val_fraction held out),
logs it and writes the steps to <workdir>/config.json.
`--config.train.stage1.epochs=0 --config.train.stage1.steps=K` sets a
stage's steps directly instead.

Hardware and expected result: NO timing was measured for this config -- no
TPU was available in the environment where it was written, and nothing here
claims a speed. The target (not a measured result) is the paper's MVTec-AD
numbers: mean image AUROC 98.9 and pixel AUROC 98.7 over the 15 categories
(the paper's means; docs/method.md). The global batch size must be
divisible by the number of devices (v5litepod-8: 8 chips; v4-32: 16 chips);
raise `train.batch_size` for bigger slices.
"""

import ml_collections

from rcae_jax import config_files


# The paper's epochs per stage (**P**).
PAPER_EPOCHS = {1: 1500, 2: 400, 3: 300}


def get_config() -> ml_collections.ConfigDict:
  # The base config, loaded by path from beside this file.
  config = config_files.base(__file__, 'default')
  data, model, train = config.data, config.model, config.train

  # ---------------------------------------------------------------- data
  # Folder holding MVTec-AD's category folders: a local path on the VM, or
  # a gs:// path where the data loader reads Cloud Storage. With
  # launch/tpu_run.sh, DATA_URL=gs://... copies it to every worker and
  # overrides this field with the local copy.
  data.root = 'gs://YOUR_BUCKET/mvtec_ad'
  # Category to train and evaluate (one model per category, as the paper).
  data.category = 'bottle'
  # Paper input size (**P**); divisible by 2**5 as N = 5 requires.
  data.image_size = 1024
  # tf.data pipeline (TensorFlow is in requirements.txt).
  data.loader = 'tfdata'

  # --------------------------------------------------------------- model
  # N = 5 recursion steps at test time (**P**).
  model.depth = 5
  # Shared encoder / decoder width (ours, C = 128; docs/method.md).
  model.width = 128
  # Residual blocks per encoder and decoder step (ours, docs/method.md).
  model.num_res_blocks = 2
  # Detail Preservation Network base width (ours).
  model.dpn_width = 32
  # Cross Recursion Detection network base width (ours).
  model.crd_width = 16
  # float32 as the paper; 'bfloat16' is worth trying on TPU (not measured).
  model.dtype = 'float32'

  # --------------------------------------------------------------- train
  # Global batch size (all devices together; divisible by the device count).
  train.batch_size = 16
  # A checkpoint every 500 steps (and at every stage end): what a Spot VM
  # preemption can cost at most.
  train.checkpoint_every = 500
  for stage, epochs in PAPER_EPOCHS.items():
    cfg = train[f'stage{stage}']
    # The paper's epochs for this stage (**P**), over the category's real
    # training set: `steps` is computed from them when the data is read.
    cfg.epochs = epochs
    # Adam learning rate 1e-4 (**P**).
    cfg.learning_rate = 1e-4

  # ---------------------------------------------------------------- eval
  # Evaluation batch (global); 1024^2 maps, so keep it modest.
  config.eval.batch_size = 16
  # Image-score smoothing window in model pixels (ours): the default's 8 px
  # is sized for 64-128 px inputs; 64 px keeps the same fraction of the
  # image (1/16, as measured at 128 px in docs/results.md) at 1024 px.
  config.eval.smoothing_size = 64
  return config
