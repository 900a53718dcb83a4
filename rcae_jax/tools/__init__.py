"""Research and performance tools: latency, input-pipeline and scaling
benchmarks, the depth and fusion reports. They may import anything; only
the mode dispatcher (run.py) imports them, lazily."""
