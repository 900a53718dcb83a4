"""The three training stages: train state and optimizer, the stage steps and
the loop, pseudo-anomaly synthesis, preemption and numeric guards (the
mesh they shard over is common/sharding.py).
The only subpackage that imports optax; nothing outside the top level
(run.py) and tools/ imports it."""
