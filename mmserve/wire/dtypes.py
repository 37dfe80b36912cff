"""The one dtype table: every dtype embedding rows (and models) may have, by name.

The names are torch's attribute names (`torch.float32`, ...). This module does not import
torch, so configuration code can validate a dtype name without it; `chunks.torch_dtype`
gives the torch dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import common_pb2


@dataclass(frozen=True, slots=True)
class DType:
    name: str  # torch's attribute name
    pb: common_pb2.DType  # its value on the wire
    # Bytes travel through an integer view of the same width: numpy has no bfloat16, and
    # an integer view is a bit-exact reinterpretation for every dtype.
    int_view: str  # little-endian numpy integer type string


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", common_pb2.DTYPE_FLOAT32, "<i4"),
    DType("float16", common_pb2.DTYPE_FLOAT16, "<i2"),
    DType("bfloat16", common_pb2.DTYPE_BFLOAT16, "<i2"),
)}
DTYPE_NAMES = tuple(DTYPES)
_BY_PB: dict[int, DType] = {d.pb: d for d in DTYPES.values()}


def by_name(name: str) -> DType:
    """"float32" | "float16" | "bfloat16" -> its table row."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def by_pb(value: int) -> DType:
    """A common_pb2.DType value -> its table row."""
    try:
        return _BY_PB[value]
    except KeyError:
        raise ValueError(f"unsupported wire dtype {value}") from None
