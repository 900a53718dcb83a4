"""The three training stages: train state and optimizer, the stage steps and
the loop, pseudo-anomaly synthesis, preemption, numeric guards and sharding.
The only subpackage that imports optax; nothing outside the top level
(run.py) and tools/ imports it."""
