"""RcAE networks as pure Flax linen modules.

- `RcAE`: ONE encoder step E and ONE decoder step D applied recursively with
  shared weights. Depth mode (the paper): I_C^i = E(I_C^{i-1}) halves the
  resolution each step, I_R^n = D^n(E^n(I)). Iterative mode (ours): a
  full-resolution autoencoder R fed its own output, x_t = R(x_{t-1}),
  expressed with `nn.scan` because its carry has a fixed shape.
- `DPN`: detail preservation, a 4-level conv U-Net predicting a residual
  from I_R^n and the input's gradient image.
- `CRD`: cross recursion detection, a 4-level 3-D conv U-Net over the stack
  of recursion steps (recursion index = depth axis), folded to one map.

No I/O, no config parsing: modules take plain fields (see `build_model`).
All reconstructions come out stacked as [N, B, H, W, C].
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """Depth-to-space on the last two spatial axes: [..., h, w, f*f*c] ->
  [..., f*h, f*w, c]. A 1x1 conv to 4c followed by this is exactly a
  kernel-2 stride-2 transposed conv, without ConvTranspose's slow XLA
  gradient (docs/performance.md, "Design choices made for speed")."""
  *lead, h, w, c = x.shape
  c_out = c // (factor * factor)
  x = x.reshape(*lead, h, w, factor, factor, c_out)
  n = len(lead)
  perm = (*range(n), n, n + 2, n + 1, n + 3, n + 4)
  x = x.transpose(perm)
  return x.reshape(*lead, h * factor, w * factor, c_out)


class ResBlock(nn.Module):
  """Pre-activation residual block; no normalisation (batch-size free)."""
  width: int
  dtype: Dtype = jnp.float32
  kernel: Sequence[int] = (3, 3)

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.width, self.kernel, dtype=self.dtype)(nn.silu(x))
    # Zero-initialised last conv: each block starts as the identity, which
    # keeps the deep recursion stable from the first step.
    y = nn.Conv(self.width, self.kernel, dtype=self.dtype,
                kernel_init=nn.initializers.zeros)(nn.silu(y))
    return x + y


class EncoderStep(nn.Module):
  """E: image-space tensor at r -> image-space tensor at r/2 (+ skip).

  The skip is a narrow (`skip_channels`) projection of the step's wide
  features. It must stay narrow: the wide features of a kernel-2 stride-2
  conv to >= 4 * (input channels) can hold a lossless space-to-depth copy
  of the step's input, so a wide skip would undo this level's compression
  (docs/method.md). With code + skip < 4 * input channels the level still loses
  information (tests/test_models.py checks it through the Jacobian rank)."""
  width: int
  out_channels: int
  num_res_blocks: int = 1
  skip_channels: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # The paper's downsampling: stride-2 convolution with kernel 2.
    h = nn.Conv(self.width, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
    for _ in range(self.num_res_blocks):
      h = ResBlock(self.width, self.dtype)(h)
    z = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(nn.silu(h))
    skip = None
    if self.skip_channels:
      skip = nn.Conv(self.skip_channels, (1, 1), dtype=self.dtype)(
          nn.silu(h))
    return z, skip


class DecoderStep(nn.Module):
  """D: image-space tensor at r (+ optional skip features) -> at 2r."""
  width: int
  out_channels: int
  num_res_blocks: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip=None):
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    h = nn.Conv(self.width, (3, 3), dtype=self.dtype)(x)
    for _ in range(self.num_res_blocks):
      h = ResBlock(self.width, self.dtype)(h)
    h = pixel_shuffle(nn.Conv(4 * self.width, (1, 1), dtype=self.dtype)(h))
    h = ResBlock(self.width, self.dtype)(h)
    return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(nn.silu(h))


class RcAE(nn.Module):
  """The recursive autoencoder.

  depth mode: returns [N, B, H, W, C] with entry n-1 = D^n(E^n(I)), or for
    `__call__(x, depth=n)` only I_R^n (used by the stage-1 step, which draws
    the depth per batch).
  iterative mode: x_t = R(x_{t-1}), R = D^L(E^L(.)) with L =
    `iterative_levels`, scanned over t = 1..N with `nn.scan`.
  """
  depth: int = 5
  width: int = 128
  num_res_blocks: int = 2
  bottleneck_channels: int = 3
  out_channels: int = 3
  skips: bool = True
  # Width of the skip (ours): with the 3-channel code, 3 keeps every level
  # lossy (6 < 4 * 3 values per position reach the decoder).
  skip_channels: int = 3
  share_weights: bool = True
  recursion: str = 'depth'
  iterative_levels: int = 2
  scan_unroll: bool = True
  # Depth mode: one decoder call per level for all depths (`decode_all`)
  # instead of one per (depth, level). Same function and parameters.
  batch_decoding: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    n_modules = 1 if self.share_weights else self.depth
    if self.recursion == 'iterative':
      n_modules = 1  # The scanned cell owns its own shared autoencoder.
      self.cell = nn.scan(
          _IterativeCell,
          variable_broadcast='params',  # One set of weights for every t.
          split_rngs={'params': False},
          length=self.depth,
          unroll=self.depth if self.scan_unroll else 1,
      )(levels=self.iterative_levels, width=self.width,
        num_res_blocks=self.num_res_blocks,
        bottleneck_channels=self.bottleneck_channels,
        out_channels=self.out_channels, skip_channels=self._skip_width(),
        dtype=self.dtype)
      return
    if self.recursion != 'depth':
      raise ValueError(f'model.recursion must be "depth" or "iterative", got '
                       f'{self.recursion!r}')
    self.encoders = [EncoderStep(self.width, self.bottleneck_channels,
                                 self.num_res_blocks, self._skip_width(),
                                 self.dtype)
                     for _ in range(n_modules)]
    self.decoders = [DecoderStep(self.width, self.out_channels,
                                 self.num_res_blocks, self.dtype)
                     for _ in range(n_modules)]

  def _skip_width(self) -> int:
    return self.skip_channels if self.skips else 0

  def _enc(self, level):  # level: 1-based recursion level.
    return self.encoders[0 if self.share_weights else level - 1]

  def _dec(self, level):
    return self.decoders[0 if self.share_weights else level - 1]

  def encode(self, x, n):
    """I_C^1..I_C^n and the narrow skip of each level (None without)."""
    codes, skips = [], []
    for level in range(1, n + 1):
      x, skip = self._enc(level)(x)
      codes.append(x)
      skips.append(skip)
    return codes, skips

  def decode(self, code, skip, n):
    """D^n applied to the level-n code.

    The skip (ours) hands a narrow projection of the deepest encoder's
    features past the bottleneck to the FIRST decoder step only, and only
    for n > 1: at n = 1 that step is the full-resolution one and its skip
    would be computed from the input itself, an identity path. So depth n
    sees only what passed n bottlenecks (plus a narrow, lossy skip of the
    (n-1)-th code). Other steps get zeros so one shared D serves every
    level."""
    x = code
    for level in range(n, 0, -1):
      x = self._dec(level)(x, self._skip_input(x, skip, n, level))
    return x

  def _skip_input(self, x, skip, n, level):
    if not self.skips:
      return None
    if level == n and n > 1:
      return skip
    return _zeros(x, self.skip_channels)

  def __call__(self, x, depth: int | None = None):
    if self.recursion == 'iterative':
      _, ys = self.cell(x.astype(self.dtype), None)
      ys = ys.astype(jnp.float32)
      return ys if depth is None else ys[depth - 1]
    self._check_size(x.shape[1:3])
    if depth is not None:
      codes, skips = self.encode(x, depth)
      return self.decode(codes[-1], skips[-1], depth).astype(jnp.float32)
    codes, skips = self.encode(x, self.depth)
    if self.batch_decoding:
      return self.decode_all(codes, skips).astype(jnp.float32)
    recs = [self.decode(codes[n - 1], skips[n - 1], n)
            for n in range(1, self.depth + 1)]
    return jnp.stack(recs).astype(jnp.float32)

  def decode_all(self, codes, skips):
    """All N reconstructions [N, B, H, W, C], the same as stacking
    `decode(codes[n-1], skips[n-1], n)` for n = 1..N, with one decoder call
    per level instead of one per (n, level): at level l every stream with
    n >= l is at the same resolution and goes through the same D^l, so the
    streams are stacked on the batch axis. N calls on up to N*B images
    instead of N(N+1)/2 calls on B (same FLOPs; fewer, larger kernels,
    which is what a GPU at batch 1 needs). Exact: the decoder has no
    batch-coupled op (no normalisation), tested against the loop.

    Off by default: on XLA:CPU it was ~20% slower than the loop
    (docs/performance.md); meant for GPUs, where it is not yet measured."""
    b = codes[0].shape[0]
    x = None  # Streams n = N..l+1, stacked on the batch axis.
    for level in range(self.depth, 0, -1):
      code = codes[level - 1]
      # Stream n = level starts here, with its skip; older ones get zeros.
      x = code if x is None else jnp.concatenate([x, code], axis=0)
      skip = None
      if self.skips:
        older = x.shape[0] - b
        new = self._skip_input(code, skips[level - 1], level, level)
        skip = new if not older else jnp.concatenate(
            [_zeros(x[:older], self.skip_channels), new], axis=0)
      x = self._dec(level)(x, skip)
    # Batch blocks are streams n = N, N-1, ..., 1: reverse to n = 1..N.
    return x.reshape(self.depth, b, *x.shape[1:])[::-1]

  def _check_size(self, hw):
    factor = 2 ** self.depth
    if hw[0] % factor or hw[1] % factor:
      raise ValueError(f'image size {hw} must be divisible by 2**depth = '
                       f'{factor} for depth {self.depth}')


def _zeros(x, channels: int):
  """Zeros with x's spatial shape and `channels` channels: the skip input of
  a decoder step that gets none (one shared D serves every level)."""
  return jnp.zeros((*x.shape[:-1], channels), x.dtype)


class _IterativeCell(nn.Module):
  """One full-resolution pass R(x) = D^L(E^L(x)) of the iterative mode.
  The narrow skip reaches the first decoder step only when it is not the
  full-resolution one (L > 1), as in the depth mode."""
  levels: int
  width: int
  num_res_blocks: int
  bottleneck_channels: int
  out_channels: int
  skip_channels: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x, _):
    enc = EncoderStep(self.width, self.bottleneck_channels,
                      self.num_res_blocks, self.skip_channels, self.dtype)
    dec = DecoderStep(self.width, self.out_channels, self.num_res_blocks,
                      self.dtype)
    h = x
    for _ in range(self.levels):
      h, skip = enc(h)
    y = h
    for level in range(self.levels, 0, -1):
      skip_in = None
      if self.skip_channels:
        skip_in = (skip if level == self.levels and level > 1
                   else _zeros(y, self.skip_channels))
      y = dec(y, skip_in)
    return y, y


class DepthConv(nn.Module):
  """A 3-D convolution (kernel 3 along the recursion axis, SAME padding)
  over [B, D, H, W, C], computed as one 2-D convolution of each step
  stacked with its two neighbours along channels. Same function and same
  parameter count as a 3x k x k conv; XLA:CPU runs 2-D convs far faster
  than 3-D ones, and on GPU it is one well-shaped batched conv."""
  features: int
  kernel: int = 3
  strides: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x):
    b, d, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([padded[:, i:i + d] for i in range(3)], -1)
    y = nn.Conv(self.features, (self.kernel, self.kernel),
                strides=(self.strides, self.strides), dtype=self.dtype,
                kernel_init=self.kernel_init)(
                    stacked.reshape(b * d, h, w, 3 * c))
    return y.reshape(b, d, *y.shape[1:])


class UNet(nn.Module):
  """A 4-level U-Net used by DPN (2-D) and CRD (3-D: the recursion axis is
  kept at full length and convolved with kernel 3, see DepthConv).

  Downsampling halves the spatial axes only (stride-2, kernel-2 conv, as the
  recursion does); upsampling is pixel shuffle; skips concatenate. Widths
  double per level up to 4x the base width.
  """
  width: int
  out_channels: int
  levels: int = 4
  ndim: int = 2  # 2: [B,H,W,C]; 3: [B,D,H,W,C] with D the recursion index.
  # GroupNorm before the output conv. It normalises per image (and per
  # recursion step) over the whole map, so the output says what stands out
  # within an image, never how large its input is: False keeps that scale
  # (CRD's `head='plain'`).
  head_norm: bool = True
  dtype: Dtype = jnp.float32

  def conv(self, features, kernel=3, strides=1, zero_init=False):
    init = (nn.initializers.zeros if zero_init
            else nn.linear.default_kernel_init)
    if self.ndim == 3 and kernel > 1:
      return DepthConv(features, kernel, strides, self.dtype, init)
    conv = nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   dtype=self.dtype, kernel_init=init)
    if self.ndim == 3:  # Pointwise along depth: fold it into the batch.
      return lambda x: conv(x.reshape(-1, *x.shape[2:])).reshape(
          *x.shape[:2], *x.shape[2:4], features)
    return conv

  def norm(self, h):
    # GroupNorm over (spatial, channel groups) per image and per recursion
    # step: batch-size free, and it keeps the deep 3-D stack's activations
    # bounded (without it CRD's logits diverged to ~1e6 in stage 3).
    groups = min(4, h.shape[-1])
    if self.ndim == 3:
      return nn.GroupNorm(groups, dtype=self.dtype)(
          h.reshape(-1, *h.shape[2:])).reshape(h.shape)
    return nn.GroupNorm(groups, dtype=self.dtype)(h)

  def block(self, h, width):
    y = self.conv(width)(nn.silu(self.norm(h)))
    return h + self.conv(width, zero_init=True)(nn.silu(self.norm(y)))

  @nn.compact
  def __call__(self, x):
    widths = [self.width * min(2 ** i, 4) for i in range(self.levels + 1)]
    skips = []
    h = self.conv(widths[0])(x)
    for i in range(self.levels):
      h = self.block(h, widths[i])
      skips.append(h)
      h = self.conv(widths[i + 1], kernel=2, strides=2)(nn.silu(h))
    h = self.block(h, widths[-1])
    for i in reversed(range(self.levels)):
      h = pixel_shuffle(self.conv(4 * widths[i], kernel=1)(h))
      h = self.conv(widths[i])(jnp.concatenate([h, skips[i]], axis=-1))
      h = self.block(h, widths[i])
    # Zero-initialised head: DPN starts as "no correction", CRD as 0.5.
    if self.head_norm:
      h = self.norm(h)
    return self.conv(self.out_channels, zero_init=True)(nn.silu(h))


class DPN(nn.Module):
  """Detail Preservation Network: I_D^n = I_R^n + UNet(I_R^n ⊕ I'), I'
  the guide of `model.dpn_guide` (losses.guide_image; made by the caller,
  so this module's only setting that shapes it is the guide's width G)."""
  width: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, recs, grad_input):
    """recs [N,B,H,W,C]; grad_input [B,H,W,G] (the guide made from I)."""
    n, b = recs.shape[:2]
    g = jnp.broadcast_to(grad_input, (n, *grad_input.shape))
    x = jnp.concatenate([recs, g], axis=-1).reshape(n * b, *recs.shape[2:4], -1)
    res = UNet(self.width, recs.shape[-1], ndim=2, dtype=self.dtype)(
        x.astype(self.dtype))
    return recs + res.reshape(recs.shape).astype(jnp.float32)


class CRD(nn.Module):
  """Cross Recursion Detection: 3-D U-Net over {I_D^n ⊕ I}, n as depth.

  Folding the recursion axis (ours): per-step logits, then the mean and the
  max over steps mixed by a 1x1 conv, so the map can use both "consistently
  off" and "off at some depth" evidence; independent of how many steps.
  """
  width: int = 16
  # Standardise each image and its detail-restored reconstructions by the
  # image's own mean and standard deviation (ours): on a dark,
  # low-contrast category a defect that moves a few grey levels is then as
  # visible to CRD as a strong one on a bright category.
  normalize: bool = False
  # Also feed |I_D^n - I| as C more channels (ours, `model.crd_residual`):
  # the cross-depth residual, which CRD should read, handed to it directly
  # beside the paper's I_D^n ⊕ I (which stays).
  residual: bool = False
  # The U-Net's output head (ours, `model.crd_head`): 'groupnorm' (a norm
  # with per-image statistics before the last conv: the map is relative to
  # each image) or 'plain' (no norm there: the map keeps the residual's
  # absolute scale, so a clean image can be uniformly low).
  head: str = 'groupnorm'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, details, image, keep_images=None):
    """details [N,B,H,W,C], image [B,H,W,C] -> map logits [B,H,W,1].

    `keep_images` (float [B], training only; `train.stage3.input_dropout`):
    0 zeroes that sample's I_D^n and I channels, leaving the residual
    channels, so CRD cannot solve its task from the look of I alone. None
    (inference) keeps everything."""
    if self.normalize:
      mean = image.mean(axis=(1, 2, 3), keepdims=True)
      std = image.std(axis=(1, 2, 3), keepdims=True) + 1e-3
      details, image = (details - mean) / std, (image - mean) / std
    n = details.shape[0]
    img = jnp.broadcast_to(image, (n, *image.shape))
    parts = [details, img]
    if keep_images is not None:
      keep = keep_images.astype(details.dtype).reshape(1, -1, 1, 1, 1)
      parts = [details * keep, img * keep]
    if self.residual:
      parts.append(jnp.abs(details - img))
    x = jnp.concatenate(parts, axis=-1)   # [N,B,H,W,2C or 3C]
    x = jnp.moveaxis(x, 0, 1).astype(self.dtype)   # [B,N,H,W,2C]
    h = UNet(self.width, 4, ndim=3, head_norm=self.head == 'groupnorm',
             dtype=self.dtype)(x)
    h = jnp.concatenate([h.mean(axis=1), h.max(axis=1)], axis=-1)
    return nn.Conv(1, (1, 1), dtype=jnp.float32)(h.astype(jnp.float32))


CRD_HEADS = ('groupnorm', 'plain')


def build_rcae(cfg) -> RcAE:
  """RcAE from `config.model` (a ConfigDict or anything with attributes)."""
  return RcAE(depth=cfg.depth, width=cfg.width,
              num_res_blocks=cfg.num_res_blocks,
              bottleneck_channels=cfg.bottleneck_channels, skips=cfg.skips,
              skip_channels=cfg.skip_channels,
              share_weights=cfg.share_weights, recursion=cfg.recursion,
              iterative_levels=cfg.iterative_levels,
              scan_unroll=cfg.scan_unroll,
              batch_decoding=cfg.batch_decoding,
              dtype=jnp.dtype(cfg.dtype))


def build_dpn(cfg) -> DPN:
  return DPN(width=cfg.dpn_width, dtype=jnp.dtype(cfg.dtype))


def build_crd(cfg) -> CRD:
  return CRD(width=cfg.crd_width, normalize=cfg.crd_normalize,
             residual=cfg.crd_residual, head=cfg.crd_head,
             dtype=jnp.dtype(cfg.dtype))


def crd_step_indices(depth: int, steps: int) -> list[int]:
  """Which recursion steps CRD sees (0-based), always ending at the
  deepest: the paper's 1/3/5-step ablation. steps = 0 means all."""
  if steps <= 0 or steps >= depth:
    return list(range(depth))
  if steps == 1:
    return [depth - 1]
  span = (depth - 1) / (steps - 1)
  return sorted({round(i * span) for i in range(steps)})
