"""What every part of the package leans on and that knows nothing of models:
file access (local and gs://), atomic writes, metric writers, the workdir
lock, the Orbax checkpoint store, ConfigError and the host allocator's
tuning (host_memory). Imports no other subpackage."""
