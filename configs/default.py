"""Default config: the full RcAE method on the built-in synthetic category.

Command (first run generates the data into ~/.cache/rcae_jax, later runs
resume from the workdir's checkpoints):

    python -m rcae_jax.main --config configs/default.py --workdir workdirs/default

Hardware and expected result: see docs/results.md, "The default run", for the
measured wall time on 2 CPU cores and the metrics it writes to
workdirs/default/metrics.json (image and pixel AUROC >= 0.90).

Every field is commented. Override any of them on the command line, e.g.
`--config.model.depth=3 --config.train.stage1.steps=100`. A trained
workdir remembers its config (<workdir>/config.json): later commands on it
need only --workdir and the fields they change, e.g.
`--workdir DIR --config.mode=predict --config.predict.inputs=FOLDER`.
"""

import ml_collections

from rcae_jax.training import anomaly_config


def _stage(steps: int, batch_size: int) -> ml_collections.ConfigDict:
  """One training stage's fields (commented in get_config)."""
  return ml_collections.ConfigDict(dict(
      steps=steps, epochs=0, learning_rate=1e-3, schedule='constant',
      warmup_steps=0, clip_norm=1.0, batch_size=batch_size))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # What main does (`python -m rcae_jax.main --help` lists them): 'train'
  # (all stages, then evaluate; rerun to resume), 'evaluate' (load the
  # latest checkpoint in --workdir, score the test set, set thresholds),
  # 'predict' (score new images: predict.inputs), 'export' (write
  # <workdir>/export/: the inference function as StableHLO for serving
  # without this code; ours). Research tools: 'benchmark' (inference
  # latency), 'depth_report' (per-depth reconstruction errors on defects vs
  # elsewhere, before and after DPN: rcae_jax/tools/depth_report.py),
  # 'fusion_report' (test metrics of CRD's map, the recursion map and
  # fusions of the two: rcae_jax/tools/fusion_report.py), 'shortcut_report'
  # (test metrics of CRD fed the real I_D^n, I, or flat grey instead,
  # beside the recursion map: does CRD use the recursion?
  # rcae_jax/tools/shortcut_report.py). On a workdir
  # that has a config.json, --config may be left out: that config is used
  # with mode 'train' unless --config.mode says otherwise.
  config.mode = 'train'
  # Seed for parameters, batch order, depth sampling and pseudo-anomalies.
  config.seed = 0
  # TensorBoard summaries in <workdir>/tensorboard and clu's progress
  # reports (need TensorFlow, clu and tensorboard installed). False: scalars
  # go to the log and scalars.jsonl only, and TensorFlow is never imported
  # (measured: ~5 CPU-seconds less start-up on 2 cores; the tests' short
  # subprocess runs use it).
  config.tensorboard = True
  # On the CPU backend with glibc: keep freed host memory in the process
  # (rcae_jax/common/host_memory.py) instead of returning it to the kernel
  # after every step, which XLA:CPU's per-step buffers then fault in again.
  # Measured: a recipe stage-3 step 10-12 % faster on one core, ~6 % on two
  # (within their spread; docs/performance.md); the process keeps its peak
  # heap. False: glibc's defaults.
  config.keep_freed_memory = True

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # Folder holding MVTec-layout category folders. Empty: the built-in
  # synthetic category, generated on first use into `synthetic_cache`.
  data.root = ''
  # Category folder name under `root` (ignored for the built-in data).
  data.category = 'synthetic'
  # Several categories in one command (e.g. all 15 of MVTec-AD): each is
  # trained and evaluated into <workdir>/<category>/, finished ones are
  # skipped on rerun, and <workdir>/metrics.json gets a `mean` entry.
  # Empty: just `category`.
  data.categories = ()
  # Layout of `root`: 'mvtec' (MVTec-AD folders, also users' own data) or
  # 'visa' (raw VisA: <cat>/Data/Images/{Normal,Anomaly} + split CSV).
  data.format = 'mvtec'
  # VisA split CSV ('' = <root>/split_csv/1cls.csv, the official 1-class).
  data.visa_split_csv = ''
  # Open every image and mask once before training (corrupt files, mask
  # sizes): a few seconds that save a crash hours into a run.
  data.check_files = True
  # Where the built-in category is written; '' means ~/.cache/rcae_jax
  # (or $RCAE_JAX_CACHE when set).
  data.synthetic_cache = ''
  # Number of images of the built-in category (train good / test good /
  # test defective per kind). Small so that the default run is fast on CPU.
  data.synthetic_train = 200
  data.synthetic_test_good = 40
  data.synthetic_test_per_defect = 20
  # Side of the generated images in pixels.
  data.synthetic_size = 128
  # Fraction of train/good held out (never trained on) to set the image
  # and pixel thresholds without looking at test labels.
  data.val_fraction = 0.1
  # Model input size: a side S (square) or, ours, a pair (H, W), e.g.
  # --config.data.image_size='(128,320)' for long parts. Declared with
  # type object so the command line may give either.
  data.image_size = ml_collections.FieldReference(64, field_type=object)
  # (ours) How each image becomes (H, W) (rcae_jax/data/geometry.py): 'squash'
  # (resized to it, aspect ratio lost, the original behaviour) or
  # 'keep_aspect' (scaled to fit inside it, edge-padded; maps are cropped
  # back to the image and the padding counts in no metric or score).
  data.resize = 'squash'
  # (ours) Tiling for images much larger than the model, whose defects a
  # resize to image_size would erase (rcae_jax/data/tiling.py;
  # docs/high_resolution.md). 0 = off. T > 0: each image is scaled by
  # image_size / T (not at all when T = image_size: native pixels) and cut
  # into image_size x image_size tiles; training draws tiles, inference
  # blends overlapping tiles' maps into one map per image. Needs a square
  # image_size and resize='squash' (tiles keep the aspect ratio and are
  # edge-padded where an image is smaller than one).
  data.tile_size = 0
  # (ours) Fraction of a tile's side that neighbouring inference tiles
  # share, in [0, 1): more overlap, smoother seams, more tiles (forward
  # passes per image: ceil((h - o) / (S - o)) x ceil((w - o) / (S - o)),
  # o = overlap x S, h x w the image at the working resolution).
  data.tile_overlap = 0.25
  # (ours) Training tiles: 'random' (one tile per image and step, anywhere
  # in it, drawn from seed and step) or 'grid' (the inference grid's
  # tiles, every one once per epoch).
  data.tile_sampling = 'random'
  # 'auto' (tf.data if TensorFlow imports, else in memory), 'tfdata' or
  # 'memory'. Both yield identical batches for the same seed.
  data.loader = 'auto'
  # Decode threads for the in-memory loader (tf.data uses AUTOTUNE).
  data.num_workers = 4
  # Training augmentation on the host ('' = none): a comma-separated subset
  # of 'hflip', 'vflip', 'rot90' (per example, drawn from seed and step;
  # both loaders identical). Textures: 'hflip,vflip,rot90'; objects: ''.
  data.augment = ''

  # --------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # 'depth' (the paper: each step halves the resolution, I_R^n =
  # D^n(E^n(I))) or 'iterative' (full-resolution reconstruction fed back
  # through one shared autoencoder, x_t = R(x_{t-1}), via nn.scan).
  model.recursion = 'depth'
  # N: recursion depth at test time (paper: 5). Training draws the depth
  # uniformly from [1, N] per batch.
  model.depth = 4
  # Width of the shared encoder / decoder steps (paper-sized runs: 128).
  model.width = 16
  # Residual blocks per encoder step and per decoder step.
  model.num_res_blocks = 1
  # Channels of the image-space bottleneck between recursion steps.
  model.bottleneck_channels = 3
  # Skip connection inside the recursion (paper: skips help; their form is
  # ours): the first decoder step of depth n > 1 also sees a narrow
  # projection of the n-th encoder step's features. Never at n = 1 (that
  # step is the full-resolution one), and narrow, so that depth n still
  # loses information at each of its n levels: no identity path.
  model.skips = True
  # Channels of that skip. Lossy while bottleneck + skip < 4 * bottleneck
  # (a kernel-2 stride-2 level sees 4 input pixels per output position).
  model.skip_channels = 3
  # Share E and D across depths (the paper's point). False only for the
  # ablation; then parameters grow with N.
  model.share_weights = True
  # Base width of the Detail Preservation Network (4-level conv AE).
  model.dpn_width = 8
  # Base width of the Cross Recursion Detection network (4-level 3D AE).
  model.crd_width = 4
  # Standardise CRD's inputs per image (ours; rcae_jax/model/models.py CRD).
  model.crd_normalize = False
  # How many recursion steps CRD sees (the paper's 1/3/5 ablation); 0 = all N.
  model.crd_steps = 0
  # (ours) Also give CRD |I_D^n - I| as channels beside the paper's
  # I_D^n ⊕ I, so that it reads the cross-depth residual directly. Changes
  # CRD's first layer: a fork resumed before stage 3 re-initialises CRD.
  model.crd_residual = False
  # (ours) CRD's output head: 'groupnorm' (a per-image norm before the last
  # conv, so the map is relative to each image) or 'plain' (no norm there:
  # the map keeps the residual's absolute scale). Changes CRD's parameters.
  model.crd_head = 'groupnorm'
  # (ours) DPN's guide I' made from the input: 'signed_diff' (per-channel
  # signed forward differences, 2C channels: the original; lossless up to
  # a constant, so DPN can integrate it back into I, defects included),
  # 'grad_mag' (gradient magnitude, 1 channel: no sign or direction) or
  # 'blurred_grad' (signed differences of I blurred with a Gaussian of
  # `dpn_guide_sigma` px). The paper says "first-order gradient image"; the
  # operator is ours. The stage losses keep their signed gradient terms.
  model.dpn_guide = 'signed_diff'
  model.dpn_guide_sigma = 2.0
  # Iterative mode: levels of the shared full-resolution autoencoder R.
  model.iterative_levels = 2
  # Scan the iterative recursion unrolled (True is required for speed on
  # XLA:CPU, jax-ml/jax#12868); rolled is fine on GPU/TPU.
  model.scan_unroll = True
  # Depth mode: decode all depths with one decoder call per level (depths
  # stacked on the batch axis) instead of one per (depth, level). Same
  # results and parameters; measured ~20% slower on XLA:CPU, so off; try it
  # on GPU (docs/performance.md).
  model.batch_decoding = False
  # Compute dtype of the networks ('float32' or 'bfloat16'); params stay f32.
  model.dtype = 'float32'

  # --------------------------------------------------------------- train
  config.train = train = ml_collections.ConfigDict()
  # Global batch size (all devices of all hosts; must divide by the device
  # count). Stages may override it with their own `batch_size`.
  train.batch_size = 16
  # Log scalars every this many steps.
  train.log_every = 50
  # Save a checkpoint every this many steps (and always at stage ends).
  train.checkpoint_every = 200
  # Checkpoints kept.
  train.keep_checkpoints = 2
  # Train on random crop_size x crop_size crops of the data.image_size
  # images (ours; 0 = whole images). Fully convolutional networks: the
  # cost per step is the crop's, inference runs on the whole image.
  train.crop_size = 0
  # Per stage (ours unless marked): steps; Adam learning rate (paper:
  # 1e-4 for 1500/400/300 epochs; 1e-3 suits our short CPU runs);
  # `schedule` 'constant' (paper: none stated) or 'cosine' (linear warmup
  # over `warmup_steps`, then cosine decay to 0); global-norm gradient
  # clipping at `clip_norm`; `batch_size` (0 = train.batch_size);
  # `epochs` (0 = off): when > 0 the stage trains that many passes over the
  # category's real training set (train/good less the held-out images; grid
  # tiles with data.tile_sampling='grid'), steps = ceil(epochs * images /
  # batch size), computed when the data is read, logged and written to
  # <workdir>/config.json; it replaces `steps` (configs/tpu.py: the paper's
  # 1500 / 400 / 300 epochs).
  # Stage 1: RcAE (E, D) on normal images; L1 + gradient L1.
  train.stage1 = _stage(steps=1000, batch_size=0)
  # Stage 2: DPN with RcAE frozen; 0 steps skips it (ablation "no DPN").
  # Stages 2 and 3 run every depth through DPN (and CRD): 8 images give N*8
  # reconstructions per step, enough on CPU.
  train.stage2 = _stage(steps=200, batch_size=8)
  # Stage 3: CRD on pseudo-anomalies with RcAE and DPN frozen; 0 skips it.
  train.stage3 = _stage(steps=300, batch_size=8)
  # (ours) Probability per sample that stage 3 zeroes CRD's I_D^n and I
  # channels, leaving only |I_D^n - I| (needs model.crd_residual), so that
  # CRD cannot find the pseudo-anomalies from the look of I alone. Training
  # only, never at test time. 0 = off.
  train.stage3.input_dropout = 0.0
  # Stage 3's loss on CRD's map: 'l2' (the paper: L2 + gradient L2 on the
  # sigmoid), 'focal' (ours: sigmoid focal loss, gamma 2) or 'bce_dice'
  # (ours: cross-entropy + soft Dice), model/losses.py crd_loss.
  train.stage3.loss = 'l2'
  # Also save every this many minutes (0 = off), and on SIGTERM always:
  # a preempted run loses at most this much work.
  train.checkpoint_minutes = 10.0
  # A step with a non-finite loss/gradient never updates the parameters.
  # False: stop with the stage and step named (the last checkpoint stays
  # good). True: skip such batches, count them, go on.
  train.skip_nonfinite = False
  # Optional cross-depth consistency loss weight in stage 1 (ours, off).
  train.consistency_weight = 0.0

  # Devices for data parallelism (one `data` mesh axis over all hosts):
  # training, evaluation and predict split every batch over them.
  config.mesh = ml_collections.ConfigDict()
  # 0 = every device JAX sees; n = the first n (e.g. 1 to debug).
  config.mesh.num_devices = 0

  # One run per workdir (ours; rcae_jax/common/workdir_lock.py): train, evaluate
  # and depth_report hold <workdir>/RUN_LOCK.json, so a second run on the
  # same workdir refuses with one line naming the first.
  config.workdir_lock = ml_collections.ConfigDict()
  # (ours) False: no lock, e.g. on storage without conditional writes.
  config.workdir_lock.enabled = True
  # (ours) A lock written on another machine (or whose host cannot be
  # checked, e.g. a gs:// workdir used from a new VM) is stale once its
  # holder has not renewed it for this many minutes (it renews every
  # stale_minutes / 5). A holder on this machine is checked by its pid.
  config.workdir_lock.stale_minutes = 10.0
  # (ours) Take over a stale lock. Off by default: only the user can know
  # that a run which stopped renewing its lock is really gone.
  config.workdir_lock.take_over = False

  # Pseudo-anomaly synthesis for stage 3 (rcae_jax/training/anomalies.py;
  # every field is explained in anomaly_config.py).
  config.anomalies = anomaly_config.default_config()

  # ---------------------------------------------------------------- eval
  config.eval = ev = ml_collections.ConfigDict()
  # Pixel map: 'crd' (the paper's M_A; needs stage 3), 'recursion'
  # (reconstruction error across depths; works after stage 1 alone) or
  # 'fused' (ours; needs stage 3): CRD's map / its median + the recursion
  # map / its median, the medians over the held-out good images, computed
  # by evaluate into <workdir>/fusion_normalisers.json and read back by
  # predict and export (rcae_jax/evaluation/fusion.py); or 'auto' (ours;
  # needs stage 3): whichever of the three best finds unseen-style
  # pseudo-anomalies pasted into the held-out good images, chosen by
  # evaluate into <workdir>/scoring_choice.json
  # (rcae_jax/evaluation/scoring_choice.py).
  ev.scoring = 'crd'
  # Image score: 'max' of the map after smoothing with `smoothing`
  # ('box', 'box_valid' (the box average over in-image pixels only, so the
  # border is not diluted) or 'gaussian', `smoothing_size` pixels at the
  # model size: scale it with data.image_size, as configs/tpu.py does),
  # 'top_mean' (the mean of the map's highest `top_fraction` of pixels:
  # 0.001 is 16 px at 128 px, a tiny defect's size) or 'mean'.
  ev.image_score = 'max'
  ev.smoothing = 'box'
  ev.smoothing_size = 8
  ev.top_fraction = 0.001
  # Batch size for evaluation.
  ev.batch_size = 16
  # Learning curves (ours): every this many steps of each stage, and at
  # each stage's end, score the test set with what is trained so far
  # (recursion map after stages 1-2, CRD after 3; model-resolution pixel
  # metrics) into `curve/*` scalars. Costs one test-set pass each; 0 = off.
  ev.every_steps = 0
  # Write each test map as float32 TIFF at the ground-truth size under
  # <workdir>/anomaly_maps/<category>/test/<defect>/<stem>.tiff (the layout
  # MVTec's official evaluation script reads).
  ev.export_maps = True
  # Picture panels (input, each depth, detail-restored, overlay) for this
  # many test images per defect type (0 = none), plus ROC/PRO curves.
  ev.pictures_per_type = 2
  # How the decision thresholds in <workdir>/thresholds.json are set
  # (ours; rcae_jax/evaluation/thresholds.py; its 'method' key says which):
  # 'quantile' (no labels: the quantiles below of held-out good training
  # images), 'f1' (F1-optimal on a labelled validation split: the
  # `f1_val_fraction` of the test images below, held out of the reported
  # metrics) or 'fixed' (the values below).
  ev.threshold = 'quantile'
  # 'quantile': image = this quantile of the held-out good images' scores
  # (about 1% of good images flagged), pixel = `pixel_quantile` of their
  # map values.
  ev.image_quantile = 0.99
  ev.pixel_quantile = 0.999
  # 'f1': fraction of the test images of each label (good, defective; at
  # least one of each) held out to choose the thresholds on; metrics.json
  # then covers the other test images only.
  ev.f1_val_fraction = 0.25
  # 'fixed': the image-score threshold (> 0), and the pixel threshold
  # (0 = the 'quantile' one).
  ev.fixed_image_threshold = 0.0
  ev.fixed_pixel_threshold = 0.0
  # AU-PRO integration limit (false-positive rate).
  ev.pro_fpr_limit = 0.3
  # Gaussian blur (sigma, px) of the recursion-error map; 0 = none.
  ev.map_sigma = 1.0
  # (ours) Gaussian blur (sigma, px) of CRD's map (eval.scoring='crd'), so
  # it is compared with the recursion map on equal terms; 0 = none (the
  # paper's raw map).
  ev.crd_sigma = 0.0
  # How the recursion-error map combines depths: 'mean', 'max' or 'last'
  # (deepest only). docs/results.md compares them on the real categories.
  ev.recursion_reduce = 'mean'
  # Pixel metrics at the ground-truth masks' own size ("ground_truth",
  # as the official MVTec evaluation) or at the model size ("model").
  ev.pixel_resolution = "ground_truth"

  # ------------------------------------------------------------- predict
  config.predict = pr = ml_collections.ConfigDict()
  # mode='predict': a folder of images (searched recursively) or
  # comma-separated folders and image files.
  pr.inputs = ''
  # Output folder ('' = <workdir>/predictions): <name>.tiff maps at each
  # image's own size, <name>.overlay.png, predictions.csv / .json, where
  # <name> is the input's path relative to the folder given (ours;
  # rcae_jax/serving/predict_inputs.py).
  pr.output = ''
  # Append finished rows to predictions.csv, and log progress with an ETA,
  # at most every this many seconds (ours): what an interrupted run can
  # lose. 0 = after every batch.
  pr.flush_seconds = 10.0
  # Write each image's float32 TIFF map (<name>.tiff) and overlay PNG
  # (<name>.overlay.png) (ours). False skips them on high-volume lines:
  # predictions.csv / .json still give every score and decision.
  pr.write_maps = True
  pr.write_overlays = True

  # -------------------------------------------------------------- export
  config.export = ex = ml_collections.ConfigDict()
  # mode='export': platforms the StableHLO artefact in <workdir>/export/ is
  # lowered for (ours), any of 'cpu', 'cuda', 'rocm', 'tpu'; () = the
  # platform the export runs on. E.g. "('cpu', 'cuda')" to export on a CPU
  # machine for a GPU line.
  ex.platforms = ()

  # ----------------------------------------------------------- benchmark
  # mode='benchmark' (rcae_jax/tools/benchmark.py, configs/benchmark.py; ours).
  config.benchmark = bench = ml_collections.ConfigDict()
  # Square input sizes to time (each divisible by 2**max(model.depth, 4)).
  bench.image_sizes = (256, 1024)
  # Batch sizes to time at every size and dtype.
  bench.batch_sizes = (1, 8, 16, 32)
  # Compute dtypes (model.dtype); parameters stay float32 in both.
  bench.dtypes = ('float32', 'bfloat16')
  # Untimed calls after compiling, per mode.
  bench.warmup = 5
  # Timed calls per mode; p50 / p90 / p99 / mean are taken over these.
  bench.iters = 50
  # 'device': uint8 inputs already on the device, outputs left there;
  # 'end_to_end': host numpy uint8 batch in, numpy map and score out.
  bench.modes = ('device', 'end_to_end')
  # A trained workdir whose latest checkpoint supplies the weights;
  # '' = random weights (speed does not depend on the values).
  bench.checkpoint_workdir = ''
  return config
