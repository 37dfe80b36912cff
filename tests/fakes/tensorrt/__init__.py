"""Fake TensorRT 10 Python API for CPU tests of the vision-engine build and runtime.

Names and call signatures follow the `tensorrt` package (Builder, create_network,
NetworkDefinitionCreationFlag, OnnxParser, IBuilderConfig, optimization profiles,
Runtime.deserialize_cuda_engine, ICudaEngine tensor queries, IExecutionContext
set_input_shape / set_tensor_address / execute_async_v3). What it checks as TensorRT does:
a strongly typed network refuses precision builder flags, and the engine's tensor types are
the ONNX graph's. The "engine" is a JSON description; executing it reads the input at its
address and writes `rows = tile mean + row index` (one value per tile and row) at the output
address, so a test sees which tiles went where. Addresses must be CPU tensors' in tests.

Test hooks: `builders` (every Builder), `contexts` (every execution context).
"""

from __future__ import annotations

import ctypes
import enum
import json

import torch

__version__ = "10.13.3.9"

builders: list = []
contexts: list = []


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7


float32, float16, bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
_TORCH = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16,
          DataType.BF16: torch.bfloat16}
_ONNX = {"FLOAT": DataType.FLOAT, "FLOAT16": DataType.HALF, "BFLOAT16": DataType.BF16}


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity
        self.errors: list[str] = []


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated, ignored since 10.0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):  # the precision flags are deprecated in 10.12
    FP16 = 0
    BF16 = 17


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.onnx = None  # what the parser read

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        name = onnx.TensorProto.DataType.Name
        graph = model.graph

        def describe(value):
            dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
            return {"name": value.name, "dims": dims,
                    "dtype": _ONNX[name(value.type.tensor_type.elem_type)].name}

        self.network.onnx = {"input": describe(graph.input[0]),
                             "output": describe(graph.output[0])}
        return True

    def get_error(self, index: int):
        return "no error"


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict = {}

    def set_shape(self, name, min, opt, max):
        self.shapes[name] = [list(min), list(opt), list(max)]


class IBuilderConfig:
    def __init__(self):
        self.flags: set = set()
        self.pools: dict = {}
        self.profiles: list = []

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger
        self.networks: list = []
        self.configs: list = []
        builders.append(self)

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        network = INetworkDefinition(flags)
        self.networks.append(network)
        return network

    def create_builder_config(self) -> IBuilderConfig:
        config = IBuilderConfig()
        self.configs.append(config)
        return config

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        precision = config.flags & {BuilderFlag.FP16, BuilderFlag.BF16}
        if network.strongly_typed and precision:
            self.logger.errors.append("precision builder flags are not allowed on a strongly "
                                      "typed network")
            return None
        return json.dumps({**network.onnx, "profile": config.profiles[0].shapes}).encode()


class ICudaEngine:
    def __init__(self, description: dict):
        self.description = description

    def _tensor(self, name: str) -> dict:
        return next(t for t in (self.description["input"], self.description["output"])
                    if t["name"] == name)

    def get_tensor_shape(self, name: str):
        return tuple(self._tensor(name)["dims"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self._tensor(name)["dtype"]]

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        return tuple(tuple(s) for s in self.description["profile"][name])

    def create_execution_context(self):
        context = IExecutionContext(self)
        contexts.append(context)
        return context


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized: bytes):
        try:
            return ICudaEngine(json.loads(serialized))
        except ValueError:
            return None


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.shapes: dict = {}
        self.addresses: dict = {}
        self.streams: list = []  # the stream handle of each execute_async_v3

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.streams.append(stream_handle)
        source, target = self.engine.description["input"], self.engine.description["output"]
        shape = self.shapes[source["name"]]
        tiles = _view(self.addresses[source["name"]], shape, DataType[source["dtype"]])
        _, rows, width = target["dims"]
        out = _view(self.addresses[target["name"]], (shape[0], rows, width),
                    DataType[target["dtype"]])
        means = tiles.float().mean(dim=(1, 2, 3))
        out.copy_(means[:, None, None] + torch.arange(rows, dtype=torch.float32)[None, :, None])
        return True


def _view(address: int, shape, dtype: DataType) -> torch.Tensor:
    torch_dtype = _TORCH[dtype]
    count = 1
    for dim in shape:
        count *= dim
    buffer = (ctypes.c_char * (count * torch_dtype.itemsize)).from_address(address)
    return torch.frombuffer(buffer, dtype=torch_dtype).view(*shape)
