"""What every part of the package leans on and that knows nothing of models:
file access (local and gs://), atomic writes, metric writers, the workdir
lock, the Orbax checkpoint store, ConfigError, the host allocator's
tuning (host_memory), the device mesh (sharding: training and
evaluation both split their batches over it) and the per-process memo of
jitted programs (programs). Imports no other subpackage."""
