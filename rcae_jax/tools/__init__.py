"""Research and performance tools: latency, input-pipeline and scaling
benchmarks, probes of single levers (a stage's step, conv layouts), the
depth, fusion and shortcut reports. They may import anything; only
the mode dispatcher (run.py) imports them, lazily."""
