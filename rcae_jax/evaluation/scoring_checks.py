"""The config checks of the choice of map: which scorings and report modes
need a trained CRD. Apart from scoring.py so that validate.py, which the
command line runs before it imports JAX, imports none."""

from __future__ import annotations

from rcae_jax.common.errors import ConfigError

# Report modes that read CRD's map, and what they do with it.
_NEEDS_CRD = {
    'fusion_report': "compares CRD's map with the recursion map",
    'shortcut_report': 're-scores CRD with its inputs replaced',
}


def check_scoring(config) -> None:
  """CRD maps (alone or fused) need a trained CRD (stage 3)."""
  scoring = config.eval.scoring
  if scoring in ('crd', 'fused', 'auto') and config.train.stage3.steps == 0:
    raise ConfigError(f"config.eval.scoring='{scoring}' needs stage 3: set "
                      "config.train.stage3.steps > 0 or "
                      "config.eval.scoring='recursion'")
  if config.mode in _NEEDS_CRD and config.train.stage3.steps == 0:
    raise ConfigError(f"config.mode='{config.mode}' {_NEEDS_CRD[config.mode]} "
                      'and needs stage 3: set config.train.stage3.steps > 0')
