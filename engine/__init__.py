"""The training kit: one loop, checkpoints, devices and precision, samplers, logs; torch, no task."""
