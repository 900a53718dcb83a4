"""What every part of the package leans on and that knows nothing of models:
file access (local and gs://), atomic writes, metric writers, the workdir
lock, the Orbax checkpoint store and ConfigError. Imports no other
subpackage."""
