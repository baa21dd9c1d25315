"""Local tooling: the broker, Triton, the whole pipeline, demo, replay, synthetic data, tail, benchmarks and the
`interest-stream` command line. Never part of the worker image; may import `core`, `stream` and `models`."""
