"""Triton python backend: returns tokenizer.json and the generation defaults."""

import faulthandler
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub prints every thread's stack to Triton's log
        here = Path(args["model_repository"]) / args["model_version"]
        tokenizer_json = (here / "tokenizer.json").read_text(encoding="utf-8")
        generation_config = (here / "generation_config.json").read_text(encoding="utf-8")
        json.loads(generation_config)  # fail at load time, not per request
        self._outputs = [
            pb_utils.Tensor("tokenizer_json", np.array([tokenizer_json.encode()], dtype=np.object_)),
            pb_utils.Tensor("generation_config", np.array([generation_config.encode()], dtype=np.object_)),
        ]

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=self._outputs) for _ in requests]
