"""The same network in PyTorch beside the JAX one: training and inference
speed ratios from one interleaved run.

    python -m rcae_jax.tools.torch_benchmark [--config configs/cpu_real.py]
        [--device cpu|cuda] [--json PATH] [--reps 5]

Builds the PyTorch twin of a config's model (the depth-mode RcAE with ONE
shared encoder step and ONE shared decoder step applied recursively, DPN,
CRD; same widths, layer shapes, initial-zero heads, GroupNorm epsilon, pixel
shuffle channel order), copies the JAX parameters into it (so it is provably
the same function: `tests/test_torch_benchmark.py` compares the outputs),
and checks before timing that both count the same parameters and the same
convolution FLOPs (JAX: `model/flops.py` on the traced function; torch: the
same formula, 2 * output elements * input channels per group * kernel
window, from forward hooks on every Conv2d), within 1 %.

Then it times, alternating one JAX and one torch repetition so that machine
noise (other jobs on shared cores) hits both sides alike:
- one training step of each stage at the config's batch and image size:
  stage 1 at every depth 1..N (the recipe draws the depth uniformly, so its
  mean step is the mean over depths), stage 2 (DPN, RcAE frozen), stage 3
  (CRD, RcAE and DPN frozen); Adam after global-norm clipping on both
  sides. JAX runs the project's own jitted step (`training/train.py`,
  non-finite guard and on-device pseudo-anomaly synthesis included); torch
  gets stage 3's pseudo-anomalous batch precomputed, which favours torch a
  little.
- inference (all N reconstructions, DPN, CRD, sigmoid map) at batches 1
  and 16 and sizes 128 and 256 px.
- peak memory: on CUDA torch's `max_memory_allocated` (reset per case) and
  JAX's compiled `memory_analysis` (arguments + outputs + temporaries) for
  inference; on CPU the process's resident-set growth above its level
  just before the call, sampled every millisecond by a thread, for both
  sides alike (allocator caches make it a lower bound).

It prints median times and ratios torch / JAX (> 1: JAX is faster) with
both thread counts, and writes the figures as JSON (--json). torch is an
optional dependency (`pip install -e .[bench]`); nothing else in the package
imports it, and nothing this tool imports needs TensorFlow.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from rcae_jax import config_files
from rcae_jax.common import fileio
from rcae_jax.common import host_memory
from rcae_jax.model import flops as flops_lib
from rcae_jax.model import inference

DEFAULT_CONFIG = os.path.join(config_files.CONFIGS_DIR, 'cpu_real.py')
FLOP_TOLERANCE = 0.01


def import_torch():
  """torch, or a one-line error saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        'torch_benchmark needs PyTorch, an optional benchmark-only '
        'dependency: pip install -e ".[bench]" (or pip install torch); '
        f'import failed: {e}') from e
  return torch


# ------------------------------------------------------ the torch network


@functools.cache
def torch_lib() -> types.SimpleNamespace:
  """The PyTorch modules, defined once torch is importable (it is optional,
  so the classes cannot live at module level)."""
  torch = import_torch()
  from torch import nn  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional  # pylint: disable=invalid-name

  class Named(nn.Module):
    """Children registered under the names Flax gives the same layers
    (Conv_0, ResBlock_1, ...: a counter per layer kind, in call order), so
    weights transfer by path and a missing or extra layer is an error."""

    def __init__(self):
      super().__init__()
      self.named = nn.ModuleDict()
      self._counts = {}

    def make(self, kind: str, module: nn.Module, name: str | None = None):
      if name is None:
        i = self._counts.get(kind, 0)
        self._counts[kind] = i + 1
        name = f'{kind}_{i}'
      self.named[name] = module
      return module

  def conv2d(cin, cout, k, stride=1):
    # Flax 'SAME': kernel 3 stride 1 pads 1; kernel 2 stride 2 and kernel 1
    # need none at even sizes.
    return nn.Conv2d(cin, cout, k, stride=stride,
                     padding=k // 2 if stride == 1 else 0)

  def pixel_shuffle(x):
    """models.pixel_shuffle in NCHW: channel (i * 2 + j) * c + co goes to
    pixel (2h + i, 2w + j) of channel co (torch's own pixel_shuffle orders
    the channels differently)."""
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.view(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(
        b, c, 2 * h, 2 * w)

  class ResBlock(Named):

    def __init__(self, width):
      super().__init__()
      self.c0 = self.make('Conv', conv2d(width, width, 3))
      self.c1 = self.make('Conv', conv2d(width, width, 3))

    def forward(self, x):
      return x + self.c1(F.silu(self.c0(F.silu(x))))

  class EncoderStep(Named):

    def __init__(self, cin, width, out, nres, skip):
      super().__init__()
      self.down = self.make('Conv', conv2d(cin, width, 2, 2))
      self.blocks = [self.make('ResBlock', ResBlock(width))
                     for _ in range(nres)]
      self.z = self.make('Conv', conv2d(width, out, 3))
      self.skip = self.make('Conv', conv2d(width, skip, 1)) if skip else None

    def forward(self, x):
      h = self.down(x)
      for block in self.blocks:
        h = block(h)
      a = F.silu(h)
      return self.z(a), (self.skip(a) if self.skip is not None else None)

  class DecoderStep(Named):

    def __init__(self, cin, width, out, nres):
      super().__init__()
      self.inp = self.make('Conv', conv2d(cin, width, 3))
      self.blocks = [self.make('ResBlock', ResBlock(width))
                     for _ in range(nres)]
      self.up = self.make('Conv', conv2d(width, 4 * width, 1))
      self.last = self.make('ResBlock', ResBlock(width))
      self.out = self.make('Conv', conv2d(width, out, 3))

    def forward(self, x, skip=None):
      if skip is not None:
        x = torch.cat([x, skip], 1)
      h = self.inp(x)
      for block in self.blocks:
        h = block(h)
      h = self.last(pixel_shuffle(self.up(h)))
      return self.out(F.silu(h))

  class RcAE(Named):
    """models.RcAE in depth mode with shared weights (the paper's)."""

    def __init__(self, m):
      super().__init__()
      if m.recursion != 'depth' or not m.share_weights:
        raise ValueError('torch_benchmark builds the depth-mode RcAE with '
                         'shared weights only (model.recursion=depth, '
                         'model.share_weights=True)')
      if m.bottleneck_channels != 3:
        raise ValueError('torch_benchmark needs model.bottleneck_channels=3')
      self.depth = m.depth
      self.skip_channels = m.skip_channels if m.skips else 0
      self.enc = self.make('', EncoderStep(3, m.width, 3, m.num_res_blocks,
                                           self.skip_channels), 'encoders_0')
      self.dec = self.make('', DecoderStep(3 + self.skip_channels, m.width, 3,
                                           m.num_res_blocks), 'decoders_0')

    def decode(self, code, skip, n):
      x = code
      for level in range(n, 0, -1):
        s = None
        if self.skip_channels:
          s = skip if (level == n and n > 1) else x.new_zeros(
              (x.shape[0], self.skip_channels, *x.shape[2:]))
        x = self.dec(x, s)
      return x

    def forward(self, x, depth=None):
      """[N, B, 3, H, W], or I_R^depth [B, 3, H, W]."""
      codes, skips = [], []
      h = x
      for _ in range(depth or self.depth):
        h, s = self.enc(h)
        codes.append(h)
        skips.append(s)
      if depth is not None:
        return self.decode(codes[-1], skips[-1], depth)
      return torch.stack([self.decode(codes[n - 1], skips[n - 1], n)
                          for n in range(1, self.depth + 1)])

  class UNet(Named):
    """models.UNet; ndim 3: [B, D, C, H, W] with kernel 3 along D
    (models.DepthConv: each step stacked with its neighbours along C)."""

    def __init__(self, cin, width, out, ndim, levels=4):
      super().__init__()
      self.ndim, self.levels = ndim, levels
      self.widths = [width * min(2 ** i, 4) for i in range(levels + 1)]
      w = self.widths
      self.first = self.conv(cin, w[0])
      self.down_blocks, self.downs = [], []
      for i in range(levels):
        self.down_blocks.append(self.block(w[i]))
        self.downs.append(self.conv(w[i], w[i + 1], 2, 2))
      self.mid = self.block(w[-1])
      self.ups, self.merges, self.up_blocks = [], [], []
      prev = w[-1]
      for i in reversed(range(levels)):
        self.ups.append(self.conv(prev, 4 * w[i], 1))
        self.merges.append(self.conv(2 * w[i], w[i]))
        self.up_blocks.append(self.block(w[i]))
        prev = w[i]
      self.head_norm = self.norm(w[0])
      self.head = self.conv(w[0], out)

    def conv(self, cin, cout, k=3, stride=1):
      if self.ndim == 3 and k > 1:
        outer = self.make('DepthConv', Named())
        outer.make('Conv', conv2d(3 * cin, cout, k, stride))
        return outer
      return self.make('Conv', conv2d(cin, cout, k, stride))

    def norm(self, c):
      return self.make('GroupNorm', nn.GroupNorm(min(4, c), c, eps=1e-6))

    def block(self, width):
      # Flax creates conv then norm, twice; counters are per kind.
      c0, n0 = self.conv(width, width), self.norm(width)
      c1, n1 = self.conv(width, width), self.norm(width)
      return (n0, c0, n1, c1)

    def apply_conv(self, layer, x):
      if self.ndim == 2:
        return layer(x)
      b, d = x.shape[:2]
      if isinstance(layer, nn.Conv2d):  # Pointwise along D: fold it.
        y = layer(x.reshape(b * d, *x.shape[2:]))
      else:
        padded = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 1))
        stacked = torch.cat([padded[:, i:i + d] for i in range(3)], 2)
        y = layer.named['Conv_0'](stacked.reshape(b * d, *stacked.shape[2:]))
      return y.reshape(b, d, *y.shape[1:])

    def apply_norm(self, layer, x):
      if self.ndim == 2:
        return layer(x)
      return layer(x.reshape(-1, *x.shape[2:])).reshape(x.shape)

    def apply_block(self, block, h):
      n0, c0, n1, c1 = block
      y = self.apply_conv(c0, F.silu(self.apply_norm(n0, h)))
      return h + self.apply_conv(c1, F.silu(self.apply_norm(n1, y)))

    def shuffle(self, x):
      if self.ndim == 2:
        return pixel_shuffle(x)
      b, d = x.shape[:2]
      y = pixel_shuffle(x.reshape(b * d, *x.shape[2:]))
      return y.reshape(b, d, *y.shape[1:])

    def forward(self, x):
      cat = 1 if self.ndim == 2 else 2
      h = self.apply_conv(self.first, x)
      skips = []
      for block, down in zip(self.down_blocks, self.downs):
        h = self.apply_block(block, h)
        skips.append(h)
        h = self.apply_conv(down, F.silu(h))
      h = self.apply_block(self.mid, h)
      for up, merge, block, skip in zip(self.ups, self.merges,
                                        self.up_blocks, reversed(skips)):
        h = self.shuffle(self.apply_conv(up, h))
        h = self.apply_conv(merge, torch.cat([h, skip], cat))
        h = self.apply_block(block, h)
      return self.apply_conv(
          self.head, F.silu(self.apply_norm(self.head_norm, h)))

  def gradients(x):
    """losses.gradients in NCHW: forward differences, zero at the far
    edge."""
    dy = torch.diff(x, dim=-2, append=x[..., -1:, :])
    dx = torch.diff(x, dim=-1, append=x[..., :, -1:])
    return dy, dx

  def l1_with_gradient(pred, target):
    (pdy, pdx), (tdy, tdx) = gradients(pred), gradients(target)
    return ((pred - target).abs().mean() + (pdy - tdy).abs().mean()
            + (pdx - tdx).abs().mean())

  def l2_with_gradient(pred, target):
    (pdy, pdx), (tdy, tdx) = gradients(pred), gradients(target)
    return ((pred - target).square().mean() + (pdy - tdy).square().mean()
            + (pdx - tdx).square().mean())

  class DPN(Named):

    def __init__(self, width):
      super().__init__()
      self.unet = self.make('UNet', UNet(3 + 6, width, 3, 2))

    def forward(self, recs, x):
      n, b = recs.shape[:2]
      g = torch.cat(gradients(x), 1).expand(n, *x.shape[:1], 6, *x.shape[2:])
      inp = torch.cat([recs, g], 2).reshape(n * b, 9, *x.shape[2:])
      return recs + self.unet(inp).reshape(recs.shape)

  class CRD(Named):

    def __init__(self, width, normalize, residual):
      super().__init__()
      self.normalize, self.residual = normalize, residual
      self.unet = self.make('UNet', UNet(9 if residual else 6, width, 4, 3))
      self.fold = self.make('Conv', conv2d(8, 1, 1))

    def forward(self, details, image, keep_images=None):
      """details [N, B, 3, H, W], image [B, 3, H, W] -> logits [B, 1, H, W];
      keep_images [B] as in models.CRD (training only)."""
      if self.normalize:
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        std = image.std(dim=(1, 2, 3), keepdim=True, correction=0) + 1e-3
        details, image = (details - mean) / std, (image - mean) / std
      img = image.expand(details.shape[0], *image.shape)
      parts = [details, img]
      if keep_images is not None:
        keep = keep_images.reshape(1, -1, 1, 1, 1)
        parts = [details * keep, img * keep]
      if self.residual:
        parts.append((details - img).abs())
      x = torch.cat(parts, 2).transpose(0, 1)  # [B, N, 6 or 9, H, W]
      h = self.unet(x)
      return self.fold(torch.cat([h.mean(1), h.amax(1)], 1))

  class Networks(nn.Module):
    """inference.Networks in torch: the RcAE, DPN and CRD of a config."""

    def __init__(self, model_cfg):
      super().__init__()
      if model_cfg.crd_head != 'groupnorm':
        raise ValueError(
            f"model.crd_head={model_cfg.crd_head!r}: the PyTorch twin mirrors "
            "CRD's 'groupnorm' head only")
      self.rcae = RcAE(model_cfg)
      self.dpn = DPN(model_cfg.dpn_width)
      self.crd = CRD(model_cfg.crd_width, model_cfg.crd_normalize,
                     model_cfg.crd_residual)
      self.crd_steps = models_crd_steps(model_cfg)

    def forward(self, x):
      """inference: float [B, 3, H, W] in [0, 1] -> map [B, H, W]."""
      recs = self.rcae(x)
      dets = self.dpn(recs, x)
      return torch.sigmoid(self.crd(dets[self.crd_steps], x))[:, 0]

  return types.SimpleNamespace(
      torch=torch, nn=nn, Networks=Networks, RcAE=RcAE, DPN=DPN, CRD=CRD,
      l1_with_gradient=l1_with_gradient, l2_with_gradient=l2_with_gradient,
      gradients=gradients)


def models_crd_steps(model_cfg) -> list[int]:
  from rcae_jax.model import models  # pylint: disable=g-import-not-at-top
  return models.crd_step_indices(model_cfg.depth, model_cfg.crd_steps)


def load_flax_params(module, tree) -> int:
  """Copies a Flax parameter tree into the torch module whose `named`
  children mirror it; returns the number of values copied. Every Flax leaf
  must land on a torch parameter and every torch parameter must be set:
  any difference in layers or shapes raises."""
  lib = torch_lib()
  torch, nn = lib.torch, lib.nn
  copied = 0
  if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
    names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
    if set(tree) != {'kernel', 'bias'} and set(tree) != {'scale', 'bias'}:
      raise ValueError(f'unexpected leaves {sorted(tree)} for {module}')
    for key, value in tree.items():
      value = np.asarray(value, np.float32)
      if key == 'kernel':  # HWIO -> OIHW.
        value = value.transpose(3, 2, 0, 1)
      target = getattr(module, names[key])
      if tuple(target.shape) != value.shape:
        raise ValueError(f'shape {value.shape} vs torch {tuple(target.shape)}'
                         f' for {module}')
      with torch.no_grad():
        target.copy_(torch.from_numpy(np.array(value, np.float32)))
      copied += value.size
    return copied
  if set(tree) != set(module.named.keys()):
    raise ValueError(f'layers differ: flax {sorted(tree)} vs torch '
                     f'{sorted(module.named.keys())}')
  for key, sub in tree.items():
    copied += load_flax_params(module.named[key], sub)
  return copied


def torch_networks(model_cfg, params, device: str = 'cpu'):
  """The torch twin of `inference.build_networks(model_cfg)` holding
  `params` (the JAX tree {'rcae', 'dpn', 'crd'})."""
  lib = torch_lib()
  nets = lib.Networks(model_cfg)
  total = sum(load_flax_params(getattr(nets, k), params[k])
              for k in ('rcae', 'dpn', 'crd'))
  n_torch = sum(p.numel() for p in nets.parameters())
  if total != n_torch:
    raise ValueError(f'copied {total} values into {n_torch} torch parameters')
  return nets.to(device)


def torch_conv_flops(module, *args) -> int:
  """2 * output elements * (input channels / groups) * kernel window of
  every Conv2d call in module(*args): flops.py's formula, analytically."""
  lib = torch_lib()
  total = [0]

  def hook(conv, _, out):
    window = int(np.prod(conv.kernel_size))
    total[0] += 2 * out.numel() * (conv.in_channels // conv.groups) * window

  handles = [m.register_forward_hook(hook) for m in module.modules()
             if isinstance(m, lib.nn.Conv2d)]
  try:
    with lib.torch.no_grad():
      module(*args)
  finally:
    for h in handles:
      h.remove()
  return total[0]


# ------------------------------------------------------------ JAX side


def jax_forward(nets: inference.Networks, params, x):
  """The inference the torch twin runs: float [B, H, W, 3] -> map."""
  recs = inference.reconstructions(nets, params, x)
  dets = inference.details(nets, params, recs, x, True)
  return jax.nn.sigmoid(inference.crd_logits(nets, params, dets, x))[..., 0]


def host_params(config, seed: int = 0) -> dict:
  """Random float32 parameters on the host (tools/benchmark.random_params:
  every head random too, so every path is live)."""
  from rcae_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  return jax.device_get(benchmark.random_params(config, seed))


def to_nchw(x: np.ndarray):
  lib = torch_lib()
  return lib.torch.from_numpy(np.array(  # A writable copy.
      np.moveaxis(np.asarray(x, np.float32), -1, -3)))


def check_same_network(config, params, size: int = 0) -> dict:
  """Parameter counts and inference conv FLOPs of both sides at one image;
  raises when they differ (FLOPs by more than FLOP_TOLERANCE)."""
  lib = torch_lib()
  size = size or int(np.atleast_1d(config.data.image_size)[0])
  nets = inference.build_networks(config.model)
  tnets = torch_networks(config.model, params)
  counts = {k: inference.count_params(params[k]) for k in params}
  torch_counts = {k: sum(p.numel() for p in getattr(tnets, k).parameters())
                  for k in ('rcae', 'dpn', 'crd')}
  if counts != torch_counts:
    raise ValueError(f'parameter counts differ: jax {counts}, torch '
                     f'{torch_counts}')
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  jax_flops = flops_lib.count_flops(
      functools.partial(jax_forward, nets), params, x).total
  torch_flops = torch_conv_flops(tnets, lib.torch.zeros(1, 3, size, size))
  rel = abs(torch_flops - jax_flops) / max(jax_flops, 1)
  if rel > FLOP_TOLERANCE:
    raise ValueError(f'FLOPs differ by {rel:.2%}: jax {jax_flops}, torch '
                     f'{torch_flops}')
  return {'params': counts, 'params_torch': torch_counts,
          'image_size': size, 'gflop_per_image_jax': jax_flops / 1e9,
          'gflop_per_image_torch': torch_flops / 1e9,
          'flop_relative_difference': rel}


# -------------------------------------------------------------- timing


class RssPeak:
  """Peak resident-set growth of this process during a `with` block,
  sampled every millisecond from /proc/self/statm (Linux; None elsewhere)."""

  def __init__(self):
    self.peak = None

  @staticmethod
  def rss() -> int | None:
    try:
      with open('/proc/self/statm', encoding='ascii') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError):
      return None

  def __enter__(self):
    self.base = self.rss()
    self._max = self.base
    self._stop = threading.Event()

    def sample():
      while not self._stop.wait(0.001):
        self._max = max(self._max, self.rss() or 0)

    self._thread = threading.Thread(target=sample, daemon=True)
    if self.base is not None:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self.base is not None:
      self._thread.join()
      self._max = max(self._max, self.rss() or 0)
      self.peak = self._max - self.base
    return False


def interleaved(jax_call, torch_call, reps: int, sync) -> dict:
  """Median seconds of each side over `reps` alternating calls (one JAX,
  one torch, ...), after one untimed warm-up call each."""
  jax_call()
  torch_call()
  sync()
  times = {'jax': [], 'torch': []}
  for _ in range(reps):
    for side, call in (('jax', jax_call), ('torch', torch_call)):
      t0 = time.perf_counter()
      call()
      if side == 'torch':
        sync()
      times[side].append(time.perf_counter() - t0)
  return {f'{side}_ms': float(np.median(t)) * 1e3 for side, t in times.items()
          } | {f'{side}_all_ms': [float(v) * 1e3 for v in t]
               for side, t in times.items()}


def peak_memory(jax_call, torch_call, device: str) -> dict:
  """Peak memory of one call of each side (see the module docstring)."""
  torch = torch_lib().torch
  if device == 'cuda':
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch_call()
    torch.cuda.synchronize()
    return {'torch_peak_bytes': int(torch.cuda.max_memory_allocated() - base),
            'torch_peak_method': 'torch.cuda.max_memory_allocated above the '
                                 'allocation before the call'}
  out = {}
  for side, call in (('jax', jax_call), ('torch', torch_call)):
    with RssPeak() as peak:
      call()
    out[f'{side}_peak_bytes'] = peak.peak
  out['peak_method'] = ('resident-set growth above the level before the call, '
                        'sampled every 1 ms (allocator caches kept from '
                        'earlier calls make it a lower bound)')
  return out


def _jax_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes
               + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    return None


def depth_steps(seed: int, depth: int, max_depth: int) -> int:
  """A step number whose drawn stage-1 depth (train.stage1_depth) is
  `depth`: the project's step function then runs that depth."""
  from rcae_jax.training import train  # pylint: disable=g-import-not-at-top
  for step in range(10000):
    if train.stage1_depth(seed, step, max_depth) == depth:
      return step
  raise ValueError(f'no step draws depth {depth}')


def training_cases(config, params, device: str, reps: int, stages, log,
                   stage1_depths=()):
  """Interleaved training-step times of each stage (see module docstring)."""
  from rcae_jax.training import anomalies  # pylint: disable=g-import-not-at-top
  from rcae_jax.training import train  # pylint: disable=g-import-not-at-top
  from rcae_jax.training import train_state  # pylint: disable=g-import-not-at-top
  lib = torch_lib()
  torch = lib.torch
  sync = _sync(device)
  nets = inference.build_networks(config.model)
  size = int(np.atleast_1d(config.data.image_size)[0])
  rows = {}
  for stage in stages:
    batch = train.stage_batch_size(config, stage)
    rng = np.random.default_rng([config.seed, stage])
    images = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
    dev_batch = {'image': jax.device_put(images)}
    x_t = (to_nchw(images) / 255.0).to(device)
    step_fn = train.make_step(config, stage, nets)
    # A fresh device copy: the step donates its state.
    full = train_state.fresh_state(jax.device_put(params), stage, config)
    holder = {'state': train_state.split(full, stage)}
    frozen = holder['state'][1]
    tnets = torch_networks(config.model, params, device)
    name = train_state.STAGES[stage - 1]
    trained = getattr(tnets, name)
    opt = torch.optim.Adam(trained.parameters(),
                           lr=config.train[f'stage{stage}'].learning_rate)
    clip = config.train[f'stage{stage}'].clip_norm

    def jax_step(step):
      state, _ = holder['state']
      new, metrics = step_fn(state, frozen, dev_batch,
                             train.step_rng(config.seed, stage, step), step)
      holder['state'] = (new, frozen)
      jax.block_until_ready((new, metrics['loss']))

    def torch_update(loss):
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trained.parameters(), clip)
      opt.step()

    if stage == 1:
      depths = stage1_depths or range(1, config.model.depth + 1)
      per = []
      for d in depths:
        step = depth_steps(config.seed, d, config.model.depth)
        t0 = time.perf_counter()
        jax_step(step)  # Compiles this depth's program.
        compile_s = time.perf_counter() - t0
        torch_call = lambda d=d: torch_update(
            lib.l1_with_gradient(tnets.rcae(x_t, depth=d), x_t))
        row = interleaved(lambda s=step: jax_step(s), torch_call, reps, sync)
        row.update(peak_memory(lambda s=step: jax_step(s), torch_call, device))
        row.update(batch=batch, image_size=size, depth=d,
                   jax_first_call_s=compile_s)
        rows[f'train_stage1_depth{d}'] = row
        per.append(row)
        log(f'stage 1 depth {d}: {_ratio_text(row)}')
      mean = {f'{s}_ms': float(np.mean([r[f'{s}_ms'] for r in per]))
              for s in ('jax', 'torch')}
      rows['train_stage1'] = dict(mean, batch=batch, image_size=size,
                                  depth=f'mean over {list(depths)}')
      continue
    tnets.rcae.requires_grad_(False)
    tnets.dpn.requires_grad_(stage == 2)
    if stage == 2:
      def torch_call():
        with torch.no_grad():
          recs = tnets.rcae(x_t)
        dets = tnets.dpn(recs, x_t)
        torch_update(lib.l1_with_gradient(dets, x_t.expand(dets.shape)))
    else:
      key = jax.random.PRNGKey(0)
      x_anom, mask = jax.jit(lambda k, x: anomalies.synthesize(
          k, x, config.anomalies))(key, inference.to_float(images))
      if config.train.stage3.loss != 'l2':
        raise ValueError(f'train.stage3.loss={config.train.stage3.loss!r}: '
                         "the PyTorch twin times the paper's 'l2' loss only")
      xa_t, mask_t = to_nchw(x_anom).to(device), to_nchw(mask).to(device)
      use_dpn = inference.uses_dpn(config)
      # Input dropout as the JAX step draws it (a Bernoulli per sample).
      drop = config.train.stage3.input_dropout
      keep_t = ((torch.rand(batch, device=device) >= drop).float()
                if drop else None)

      def torch_call():
        with torch.no_grad():
          recs = tnets.rcae(xa_t)
          dets = tnets.dpn(recs, xa_t) if use_dpn else recs
        pred = torch.sigmoid(tnets.crd(dets[tnets.crd_steps], xa_t, keep_t))
        torch_update(lib.l2_with_gradient(pred, mask_t))
    t0 = time.perf_counter()
    jax_step(0)
    compile_s = time.perf_counter() - t0
    row = interleaved(lambda: jax_step(1), torch_call, reps, sync)
    row.update(peak_memory(lambda: jax_step(1), torch_call, device))
    row.update(batch=batch, image_size=size, jax_first_call_s=compile_s)
    rows[f'train_stage{stage}'] = row
    log(f'stage {stage}: {_ratio_text(row)}')
  return rows


def inference_cases(config, params, device: str, reps: int, sizes, batches,
                    log):
  lib = torch_lib()
  torch = lib.torch
  sync = _sync(device)
  nets = inference.build_networks(config.model)
  tnets = torch_networks(config.model, params, device).eval()
  tnets.requires_grad_(False)
  dev_params = jax.device_put(params)
  rows = {}
  for size in sizes:
    for batch in batches:
      x = np.random.default_rng([size, batch]).uniform(
          size=(batch, size, size, 3)).astype(np.float32)
      xd = jax.device_put(x)
      t0 = time.perf_counter()
      compiled = jax.jit(functools.partial(jax_forward, nets)).lower(
          dev_params, xd).compile()
      compile_s = time.perf_counter() - t0
      x_t = to_nchw(x).to(device)
      jax_call = lambda c=compiled, xd=xd: jax.block_until_ready(
          c(dev_params, xd))

      def torch_call(x_t=x_t):
        with torch.inference_mode():
          tnets(x_t)

      row = interleaved(jax_call, torch_call, reps, sync)
      row.update(peak_memory(jax_call, torch_call, device))
      row.update(batch=batch, image_size=size, jax_compile_s=compile_s,
                 jax_compiled_memory_bytes=_jax_memory(compiled))
      rows[f'infer_{size}px_b{batch}'] = row
      log(f'inference {size} px batch {batch}: {_ratio_text(row)}')
  return rows


def _sync(device: str):
  torch = torch_lib().torch
  if device == 'cuda':
    return torch.cuda.synchronize
  return lambda: None


def _ratio_text(row) -> str:
  return (f'jax {row["jax_ms"]:.1f} ms, torch {row["torch_ms"]:.1f} ms, '
          f'torch/jax {row["torch_ms"] / row["jax_ms"]:.2f}')


def threads(device: str) -> dict:
  torch = torch_lib().torch
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  return {
      'torch_intra_op_threads': torch.get_num_threads(),
      'torch_interop_threads': torch.get_num_interop_threads(),
      'jax_cpu_threads': affinity,
      'jax_cpu_threads_note': ('XLA:CPU runs one intra-op thread pool of '
                               'as many threads as cores available to the '
                               'process'),
      'cpu_cores_available': affinity,
      'device': device,
  }


def run(config, *, device: str = 'cpu', reps: int = 5, sizes=(128, 256),
        batches=(1, 16), stages=(1, 2, 3), json_path: str = '',
        log=print, stage1_depths=(), keep_freed_memory: bool = False) -> dict:
  """The whole comparison; returns (and writes to json_path) the report.
  `keep_freed_memory`: whether the caller tuned glibc (recorded only)."""
  lib = torch_lib()
  params = host_params(config, config.seed)
  same = check_same_network(config, params)
  log(f'same network: {same["params"]} parameters, '
      f'{same["gflop_per_image_jax"]:.3f} GFLOP per {same["image_size"]} px '
      f'image in JAX, {same["gflop_per_image_torch"]:.3f} in torch')
  report = {
      'threads': threads(device), 'same_network': same,
      'environment': {
          'jax': jax.__version__, 'torch': lib.torch.__version__,
          'python': platform.python_version(), 'jax_backend':
          jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'keep_freed_memory': keep_freed_memory,
          'machine': platform.machine(), 'cpu_count': os.cpu_count()},
      'reps': reps, 'cases': {}, 'created_unix': time.time(),
      'ratio_note': 'torch median / JAX median: > 1 means JAX is faster',
  }
  report['cases'].update(training_cases(config, params, device, reps, stages,
                                        log, stage1_depths))
  report['cases'].update(inference_cases(config, params, device, reps, sizes,
                                         batches, log))
  report['ratios'] = {k: v['torch_ms'] / v['jax_ms']
                      for k, v in report['cases'].items()}
  log(format_table(report))
  if json_path:
    fileio.write_json_atomic(json_path, report)
  return report


def format_table(report) -> str:
  t = report['threads']
  lines = [f'torch {t["torch_intra_op_threads"]} intra-op threads; JAX '
           f'(XLA:{report["environment"]["jax_backend"]}) '
           f'{t["jax_cpu_threads"]} cores; device {t["device"]}',
           f'{"case":28s} {"jax_ms":>10s} {"torch_ms":>10s} {"torch/jax":>9s}']
  for k, v in report['cases'].items():
    lines.append(f'{k:28s} {v["jax_ms"]:10.1f} {v["torch_ms"]:10.1f} '
                 f'{v["torch_ms"] / v["jax_ms"]:9.2f}')
  return '\n'.join(lines)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(',') if v)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config file whose model is compared')
  parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
  parser.add_argument('--json', default='', help='write the report here')
  parser.add_argument('--reps', type=int, default=5,
                      help='timed repetitions per side and case')
  parser.add_argument('--sizes', default='128,256')
  parser.add_argument('--batches', default='1,16')
  parser.add_argument('--stages', default='1,2,3')
  parser.add_argument('--stage1_depths', default='',
                      help='stage-1 depths timed (default: 1..N; the '
                      'recipe draws them uniformly)')
  parser.add_argument('--image_size', type=int, default=0,
                      help='training image size (0: the config\'s)')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch intra-op threads (0: the cores available, '
                      'as XLA:CPU uses)')
  parser.add_argument('--keep_freed_memory', action='store_true',
                      help="glibc tuned as config.keep_freed_memory does "
                      "(the whole process: both sides)")
  args = parser.parse_args(argv)
  tuned = args.keep_freed_memory and host_memory.keep_freed_memory()
  torch = import_torch()
  jax.config.update('jax_platforms', 'cuda' if args.device == 'cuda'
                    else 'cpu')
  if args.device == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('torch_benchmark: --device cuda but torch sees no GPU')
  if args.device == 'cpu':
    torch.set_num_threads(args.torch_threads or threads('cpu')[
        'cpu_cores_available'])
  config = config_files.load(args.config)
  if args.image_size:
    config.data.image_size = args.image_size
  run(config, device=args.device, reps=args.reps, sizes=_ints(args.sizes),
      batches=_ints(args.batches), stages=_ints(args.stages),
      json_path=args.json, stage1_depths=_ints(args.stage1_depths),
      keep_freed_memory=tuned)
  return 0


if __name__ == '__main__':
  sys.exit(main())
