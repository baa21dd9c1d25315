"""Triton python-backend model: the CPU twin of the production `onnxruntime_onnx` model.

`interest-stream export` copies this file to `<twin repo>/interest_transformer/1/model.py` next to the same
`model.onnx`. It runs inside tritonserver's python stub (numpy + onnxruntime only, no project imports). Dynamic
batching hands `execute` several requests; they are concatenated into one onnxruntime call, because per-request
calls cost ~10x at batch 1, then split back in order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"]) / args["model_version"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "0")) or min(4, os.cpu_count() or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # cores are shared with the worker
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.logger = pb_utils.Logger
        self.logger.log_info(f"{config['name']}: onnxruntime {ort.__version__} on CPU, {threads} intra-op threads")

    def execute(self, requests: list) -> list:
        try:
            parts = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
            sizes = [p[0].shape[0] for p in parts]
            feed = {
                n: np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                for i, n in enumerate(self.inputs)
            }
            results = self.session.run(self.outputs, feed)
        except Exception as e:  # one bad request fails the whole batch; say why to each caller
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(r[start : start + size]))
                for n, r in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
