"""ONNX -> TensorRT engine (needs an NVIDIA GPU and TensorRT), and the checks that run on CPU.

Modules, in the order a build runs: coverage.py (CPU: operator coverage, graph facts), build.py
(the engine builder, progress, summary), native.py (config.pbtxt of the native TensorRT-backend
flavour), command.py (the `gptpipe build-engine` typer command).

TensorRT builds from the portable graph, `export_onnx(..., kv_cache="dynamic")`: standard ONNX
ops, past ++ new by Concat. (The static-cache graph uses ONNX Runtime's
com.microsoft::GroupQueryAttention, which TensorRT's ONNX parser has no importer for.)

On CPU, before any GPU is involved (and in CI):
- `check_onnx_for_tensorrt`: every node is an ONNX-standard op that TensorRT's ONNX parser
  supports, with a supported data type and opset, for the pinned TensorRT release
  (export/data/tensorrt_onnx_ops.json: onnx-tensorrt's docs/operators.md of that release);
- `serving.engine.profiles.check_profiles`: the optimisation profiles cover the KV pool and
  config.pbtxt's max_batch_size.

On a GPU, `build_engine`: builder + OnnxParser; one optimisation profile per phase (decode:
T == 1 up to max_batch rows; prefill: prompts), precision flags, a timing cache, the builder
optimisation level, optionally a version-compatible engine; progress through an
IProgressMonitor that drives a rich progress bar; a summary from the engine inspector.

Precisions: fp32, fp16 and bf16 build from the fp32 (or fp16) ONNX with TensorRT's precision
flags; the KV cache I/O is fp16 for every precision but fp32 (half the pool), logits stay fp32
(the tensor table). In fp16, TensorRT's LayerNorm layers are asked to stay fp32 (GPT-2's
activations overflow fp16 in the mean of squares). int8 and fp8 need an explicitly quantized
graph (QuantizeLinear/DequantizeLinear, e.g. from NVIDIA ModelOpt): TensorRT 10 has no implicit
int8 for graphs without them, and gptpipe's own int8 ONNX (ONNX Runtime's dynamic quantization,
DynamicQuantizeLinear + MatMulInteger) is not parseable by TensorRT at all.
"""
