"""Memory and strided copies for the paged step runtime: the `Ops` interface, `HostOps` (numpy
buffers: what the CPU tests run) and `CudaOps` (cuda-python: device buffers, one stream, CUDA
graph capture and replay; GPU only, importable without one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.engine.gpu_libs import import_cudart


def check_copy2d(dst_size: int, dst_offset: int, dst_pitch: int, src_size: int, src_offset: int,
                 src_pitch: int, width: int, height: int) -> None:
    """Bounds of a strided copy (cudaMemcpy2D semantics, bytes): refuse rather than scribble."""
    if width > dst_pitch or width > src_pitch or min(dst_offset, src_offset, width, height) < 0:
        raise ValueError(f"bad 2-D copy: width {width}, pitches {dst_pitch}/{src_pitch}, "
                         f"offsets {dst_offset}/{src_offset}")
    if height and width:
        for name, size, offset, pitch in (("destination", dst_size, dst_offset, dst_pitch),
                                          ("source", src_size, src_offset, src_pitch)):
            end = offset + (height - 1) * pitch + width
            if end > size:
                raise ValueError(f"2-D copy runs past the {name} buffer: ends at byte {end}, size {size}")


class Ops(Protocol):
    def alloc(self, nbytes: int) -> Any: ...
    def nbytes(self, buffer: Any) -> int: ...
    def copy2d(self, dst: Any, dst_offset: int, dst_pitch: int, src: Any, src_offset: int,
               src_pitch: int, width: int, height: int) -> None: ...
    def upload(self, dst: Any, array: np.ndarray, offset: int = 0) -> None: ...
    def download(self, src: Any, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray: ...
    def synchronize(self) -> None: ...


class HostOps:
    """Buffers are flat uint8 numpy arrays; copies are strided numpy assignments with the same
    offsets and pitches a cudaMemcpy2D gets (what the CPU tests run)."""

    def alloc(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8)

    @staticmethod
    def wrap(array: np.ndarray) -> np.ndarray:
        """A flat byte view of a C-contiguous array (shares its memory)."""
        if not array.flags.c_contiguous:
            raise ValueError("HostOps.wrap needs a C-contiguous array")
        return array.reshape(-1).view(np.uint8)

    def nbytes(self, buffer: np.ndarray) -> int:
        return int(buffer.nbytes)

    def copy2d(self, dst: np.ndarray, dst_offset: int, dst_pitch: int, src: np.ndarray, src_offset: int,
               src_pitch: int, width: int, height: int) -> None:
        check_copy2d(dst.nbytes, dst_offset, dst_pitch, src.nbytes, src_offset, src_pitch, width, height)
        if not (width and height):
            return
        strided = np.lib.stride_tricks.as_strided
        d = strided(dst[dst_offset:], shape=(height, width), strides=(dst_pitch, 1))
        s = strided(src[src_offset:], shape=(height, width), strides=(src_pitch, 1))
        d[...] = s

    def view(self, buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        return buffer[offset:offset + n].view(dtype).reshape(shape)

    def upload(self, dst: np.ndarray, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        dst[offset:offset + data.nbytes] = data

    def download(self, src: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return self.view(src, dtype, shape, offset).copy()

    def synchronize(self) -> None:
        pass


@dataclass(frozen=True)
class DeviceBuffer:
    ptr: int
    nbytes: int


class CudaOps:
    """Device memory and copies on one CUDA stream (cuda-python). GPU only."""

    def __init__(self, device: int = 0) -> None:
        self.cudart = import_cudart()
        self._check(self.cudart.cudaSetDevice(device))
        self.stream = self._check(self.cudart.cudaStreamCreate())
        self.device = device
        self._buffers: list[DeviceBuffer] = []
        self._keepalive: list[np.ndarray] = []  # host sources of async copies, until the next sync
        kinds = self.cudart.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost,
                                           kinds.cudaMemcpyDeviceToDevice)

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = int(self._check(self.cudart.cudaMalloc(max(int(nbytes), 1))))
        self._check(self.cudart.cudaMemset(ptr, 0, max(int(nbytes), 1)))
        buffer = DeviceBuffer(ptr, int(nbytes))
        self._buffers.append(buffer)
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        self._check(self.cudart.cudaFree(buffer.ptr))
        self._buffers.remove(buffer)

    def nbytes(self, buffer: DeviceBuffer) -> int:
        return buffer.nbytes

    def copy2d(self, dst: DeviceBuffer, dst_offset: int, dst_pitch: int, src: DeviceBuffer, src_offset: int,
               src_pitch: int, width: int, height: int) -> None:
        check_copy2d(dst.nbytes, dst_offset, dst_pitch, src.nbytes, src_offset, src_pitch, width, height)
        if width and height:
            self._check(self.cudart.cudaMemcpy2DAsync(dst.ptr + dst_offset, dst_pitch, src.ptr + src_offset,
                                                      src_pitch, width, height, self._d2d, self.stream))

    def upload(self, dst: DeviceBuffer, array: np.ndarray, offset: int = 0) -> None:
        array = np.ascontiguousarray(array)
        if offset + array.nbytes > dst.nbytes:
            raise ValueError(f"upload of {array.nbytes} bytes at {offset} overruns a {dst.nbytes}-byte buffer")
        self._keepalive.append(array)
        self._check(self.cudart.cudaMemcpyAsync(dst.ptr + offset, array.ctypes.data, array.nbytes,
                                                self._h2d, self.stream))

    def download(self, src: DeviceBuffer, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if offset + out.nbytes > src.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes at {offset} overruns a {src.nbytes}-byte buffer")
        self._check(self.cudart.cudaMemcpyAsync(out.ctypes.data, src.ptr + offset, out.nbytes,
                                                self._d2h, self.stream))
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))
        self._keepalive.clear()

    def close(self) -> None:
        self.synchronize()
        for buffer in list(self._buffers):
            self.free(buffer)
        self._check(self.cudart.cudaStreamDestroy(self.stream))

    # CUDA graphs: capture what is enqueued on the stream, replay it later
    def begin_capture(self) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(self.cudart.cudaStreamBeginCapture(self.stream, mode))

    def end_capture(self) -> Any:
        graph = self._check(self.cudart.cudaStreamEndCapture(self.stream))
        try:
            return self._check(self.cudart.cudaGraphInstantiate(graph, 0))
        finally:
            self._check(self.cudart.cudaGraphDestroy(graph))

    def abort_capture(self) -> None:
        result = self.cudart.cudaStreamEndCapture(self.stream)  # ends a broken capture; errors expected
        if isinstance(result, tuple) and len(result) > 1 and result[1]:
            self.cudart.cudaGraphDestroy(result[1])

    def launch(self, graph_exec: Any) -> None:
        self._check(self.cudart.cudaGraphLaunch(graph_exec, self.stream))

    def destroy_graph(self, graph_exec: Any) -> None:
        self._check(self.cudart.cudaGraphExecDestroy(graph_exec))
