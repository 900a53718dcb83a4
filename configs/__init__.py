"""Config files: each defines get_config() -> ml_collections.ConfigDict.

`--config configs/<name>.py` loads one by path, from any working directory;
derived configs load their base beside them (rcae_jax.config_files.base),
so nothing here edits the import path. From the repository root they also
import as a package: `from configs import default`. configs/default.py says what
every field does.
"""
