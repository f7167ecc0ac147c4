"""Benchmarks of fdcam: `python -m benchmarks.latency --help` (latency, throughput, memory against pytorch-grad-cam)."""
