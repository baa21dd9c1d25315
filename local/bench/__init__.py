"""Benchmarks run by `interest-stream bench ...`: each measures its figures in one run on one machine."""
