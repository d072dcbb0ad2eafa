"""Measuring models the same way before and after compression: size, params, latency, fidelity."""
