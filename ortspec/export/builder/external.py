"""Write a graph's large initializers straight into its external data file as the builder makes them.

The graph then holds only references (file, offset, length), so building a model of any size keeps one
weight in memory at a time, and saving the graph writes a few megabytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGNMENT = 4096  # page-aligned, so ONNX Runtime can map the data instead of copying it
INLINE_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph


class ExternalData:
    """Appends tensors to one file beside the graph (`model.onnx.data` for `model.onnx`)."""

    def __init__(self, graph_path: Path) -> None:
        self.path = Path(graph_path).with_name(Path(graph_path).name + ".data")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115  (closed by `close`, once the graph is built)
        self._offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """The initializer `name` holding `array`: in the graph if small, else a reference to its bytes here."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        pad = -self._offset % ALIGNMENT
        self._file.write(bytes(pad))
        self._offset += pad
        array.tofile(self._file)
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self._offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self._offset += array.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()


def save_graph(model: onnx.ModelProto, path: Path, data: ExternalData) -> list[Path]:
    """Save a graph whose large tensors `data` holds; return the files (graph, data)."""
    data.close()
    path.write_bytes(model.SerializeToString())
    return [path, data.path]
