"""The engine on the server: what the `gpt` model runs, in the order a step flows through it.

- step.py: the per-step hot path (gather the queued steps -> scheduler -> runtime.step -> respond)
- scheduler.py: batches many sequences' steps into runtime calls, chunked prefill; StepQueue (in-flight batching)
- prefix_cache.py: `PrefixCache`, KV of earlier prompts' blocks reused by new sequences
- loader.py: `load_runtime`, the runtime for an engine file by its suffix
- runtime.py: `OrtRuntime` (ONNX Runtime, the static in-place KV cache)
- runtime_trt.py: `TrtRuntime` (TensorRT engine, GPU); paged.py: its step logic over any engine;
  host_engine.py: the CPU stand-in engine; memory.py: host / CUDA buffers and copies;
  profiles.py: optimisation profiles; gpu_libs.py: the pinned TensorRT / cuda-python imports
- contract.py: the `Runtime` protocol and the step checks both runtimes share
- kv_cache.py: `KVPool`, the preallocated KV slots
- stub_bls.py: `RetiredIterators`, decoupled BLS iterators held until Triton 2.51's stub lets go of
  them (the `generate` and `gpt` stubs; it frees them without the GIL otherwise)
"""
