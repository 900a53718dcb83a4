"""How a map becomes a score: the choice of map and its checks."""

from __future__ import annotations

from rcae_jax.common.errors import ConfigError


def check_scoring(config) -> None:
  """CRD maps need a trained CRD (stage 3)."""
  if config.eval.scoring == 'crd' and config.train.stage3.steps == 0:
    raise ConfigError("config.eval.scoring='crd' needs stage 3: set "
                      "config.train.stage3.steps > 0 or "
                      "config.eval.scoring='recursion'")
  if config.mode == 'fusion_report' and config.train.stage3.steps == 0:
    raise ConfigError("config.mode='fusion_report' compares CRD's map with "
                      'the recursion map and needs stage 3: set '
                      'config.train.stage3.steps > 0')
