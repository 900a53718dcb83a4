"""The pseudo-anomaly settings' defaults, `config.anomalies`
(anomalies.py reads them). Apart from anomalies.py so that configs/default.py,
which every command line loads while parsing its flags, imports no JAX."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """Default pseudo-anomaly settings (all static; read at trace time)."""
  c = ml_collections.ConfigDict()
  # Probability that a sample is returned unchanged with an all-zero mask, so
  # the detector sees negatives too.
  c.clean_fraction = 0.2
  # Anomaly kinds to draw from (names in KINDS), and their relative weights.
  # Tuples, not lists, so the config stays hashable/static.
  c.kinds = ('patch', 'line', 'copy_paste')
  c.kind_weights = (1.0, 1.0, 1.0)
  # Side length of patches / copy-paste regions as a fraction of the image
  # side (height for the vertical side, width for the horizontal one).
  c.min_size = 0.05
  c.max_size = 0.3
  # Each anomalous sample gets between 1 and max_patches shapes; each shape
  # independently draws its own kind.
  c.max_patches = 3
  # Maximum line width as a fraction of the shorter image side; a line is
  # always at least 1 px wide.
  c.line_width_max = 0.03
  # Minimum mean absolute change (per channel) inside a shape, so anomalies
  # are not invisible: colours are pushed away from the local mean, and
  # copy-pastes that barely differ from what they cover get a brightness
  # offset.  Guaranteed (per shape, relative to the image it is drawn on) for
  # patches and lines; copy-paste can fall slightly short through clipping to
  # [0, 1], and later shapes overlapping earlier ones can reduce the change.
  c.min_contrast = 0.15
  # Opacity of every shape is uniform in [min_opacity, 1].
  c.min_opacity = 0.5
  # Probability that a patch is an ellipse instead of a rectangle.
  c.ellipse_prob = 0.5
  # Copy-paste transforms: probability of each flip (vertical and horizontal
  # independently), probability of a 90-degree rotation (forces a square
  # region), and maximum relative brightness change (multiplicative, +-).
  c.flip_prob = 0.5
  c.rotate_prob = 0.5
  c.brightness_max = 0.2
  # Noise-texture anomalies (ours, after DRAEM): the probability that an
  # anomalous sample gets, instead of the shapes above, blob-shaped regions
  # of smooth random noise thresholded (a stand-in for Perlin noise) filled
  # with texture from ANOTHER training image of the batch, shifted and
  # flipped, blended with opacity in [min_opacity, 1]. Irregular outlines
  # and plausible texture, closer to real defects than solid shapes. 0: off.
  c.noise_fraction = 0.0
  # Noise cell size as a fraction of the image side, drawn log-uniformly:
  # small cells give many small blobs, large ones few big regions.
  c.noise_min_cell = 1 / 32
  c.noise_max_cell = 1 / 2
  # The blob threshold in standard deviations of the noise field, uniform
  # in this range: about 16 % (1.0) to 2 % (2.0) of the image is covered.
  c.noise_threshold = (1.0, 2.0)
  # 'paper': the fields above (the paper's three kinds; bit-identical to
  # before). 'realistic' (ours): `realistic.*` below, the fields above are
  # not read. One switch for the whole recipe; each knob is a field.
  c.style = 'paper'
  c.realistic = r = ml_collections.ConfigDict()
  # Probability of a clean sample (all-zero mask): about half (ours).
  r.clean_fraction = 0.5
  # Outline of the one defect per anomalous sample, and relative weights:
  # 'blob' (smooth noise thresholded around an elongated centre: irregular
  # outlines), 'scar' (a thin, slightly wavy segment at any angle), 'rect'
  # (a rectangle at any angle; with 'self' it is CutPaste).
  r.shapes = ('blob', 'scar', 'rect')
  r.shape_weights = (3.0, 1.0, 0.0)
  # What fills it, and relative weights: 'palette' (a colour of the image
  # itself, picked among 8 of its pixels as the one farthest from what it
  # covers, shifted in brightness by up to +-palette_jitter), 'self' (the
  # same image sampled around another point, rotated by any angle, rescaled
  # by `scale`, then gamma in `gamma` with probability 1/2 and inverted
  # with probability `invert_prob`), 'warp' (the image displaced by a
  # smooth field of up to `warp_max` of the shorter side, inside the
  # outline: dents, bends).
  r.fills = ('palette', 'self', 'warp')
  r.fill_weights = (1.0, 1.0, 1.0)
  # Area of blobs and rectangles as a fraction of the image, log-uniform:
  # real defects cover ~0.1 % to a few %.
  r.min_area = 0.001
  r.max_area = 0.05
  # Scar length (fraction of the shorter side, uniform) and maximum width
  # (fraction of the shorter side; at least 1 px).
  r.scar_length = (0.1, 0.5)
  r.scar_width = 0.02
  # Opacity of palette and self fills, uniform in [min_opacity, 1] (low
  # values give low-contrast defects); warps are not blended.
  r.min_opacity = 0.2
  # Edge softness: the outline is blurred with a Gaussian of sigma uniform
  # in [0, edge_sigma] px before blending.
  r.edge_sigma = 1.0
  r.palette_jitter = 0.15
  r.scale = (0.5, 2.0)
  r.gamma = (0.4, 2.5)
  r.invert_prob = 0.2
  r.warp_max = 0.03
  # Visibility: a pixel is labelled anomalous only if some channel changed
  # by more than this (about 5 grey levels in 255); smaller changes are
  # reset to the input. "Do not label what cannot be seen."
  r.visible_change = 0.02
  # What is labelled (ours). 'pixel': each pixel that changed visibly (on a
  # texture, a self fill or a warp changes some pixels and not their
  # neighbours, so the label is a speckle that follows the texture).
  # 'region': the whole outline, if the change averaged over it is visible;
  # else the sample is left clean. Real ground truth is drawn as regions.
  r.label = 'pixel'
  return c
