"""Open Inference Protocol v2 (KServe v2, Triton): ``POST /v2/models/{name}[/versions/{v}]/infer``.

Each input and output is a tensor ``{"name", "shape", "datatype", "data"}``; ``data`` is flat or
nested, row-major, and must fill ``shape``. The instance count is the first dimension, which
every input must share. ``BYTES`` tensors are checked and counted but not converted.

Binary tensors (the ``Inference-Header-Content-Length: N`` extension: N bytes of JSON header, then
the raw tensor bytes) are counted from the header's shapes and marked ``ParsedRequest.binary``; the
route's policy decides whether they may pass, since their values can be neither read nor
protected. A JSON request that asks for binary outputs, and any tensor in shared memory, is
refused with ``unsupported_media`` (415); a binary answer is recognised by
:func:`is_binary_response` and passed through (or refused) by the caller. Rewritten outputs are
written back in the nesting they came in: flat stays flat, nested stays nested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from extauthz.dialects.base import (
    DATATYPES,
    DialectError,
    NumericArray,
    ParsedRequest,
    ParsedResponse,
    check_batch,
    check_replacements,
    dump_json,
    encode_output,
    load_json,
    typed_data,
    upstream_error,
)

__all__ = ["BINARY_HEADER", "OipV2Dialect", "binary_header_length", "is_binary_response"]

#: The binary tensor extension's header: the byte length of the JSON header that starts the body.
BINARY_HEADER: Final = "inference-header-content-length"
# Bytes per element of each fixed-size datatype in a binary tensor.
_ITEMSIZE: Final = {
    name: np.dtype(np_type).itemsize for name, np_type in DATATYPES.items() if np_type is not None
}
# A BYTES element in binary form is a 4-byte little-endian length, then the bytes.
_BYTES_PREFIX: Final = 4

_PATH: Final = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer")
# Parameters that move tensor data out of the JSON body, where it cannot be read.
_OUT_OF_BODY: Final = ("binary_data_size", "shared_memory_region")


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    datatype: str
    data: object
    where: str
    binary_size: int | None = None
    """``parameters.binary_data_size``: the tensor's bytes after the JSON header."""


class OipV2Dialect:
    """Parse and re-serialize Open Inference Protocol v2 JSON bodies."""

    __slots__ = ()
    name: str = "oip_v2"

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` is ``/v2/models/{name}[/versions/{v}]/infer``."""
        return _PATH.fullmatch(path.partition("?")[0]) is not None

    def parse_request(
        self, body: bytes, *, max_instances: int, headers: Mapping[str, str] | None = None
    ) -> ParsedRequest:
        """Count the instances (shared first dimension) and read the numeric input tensors.

        With the binary extension's header in ``headers``, only the JSON header is parsed: the
        count comes from the tensors' shapes and the result is marked ``binary``, with no inputs.
        """
        length = binary_header_length(headers, len(body)) if headers else None
        if length is not None:
            return _parse_binary(body, length, max_instances)
        doc = _object(load_json(body))
        _refuse_out_of_body_outputs(doc)
        tensors = _tensors(doc, "inputs", allow_empty=False)
        count = _batch_size(tensors)
        check_batch(count, max_instances)
        inputs = {}
        for t in tensors:
            numeric = typed_data(t.data, t.shape, t.datatype, t.where)
            if numeric is not None:
                inputs[t.name] = numeric.values
        return ParsedRequest(count, inputs, doc)

    def parse_response(self, body: bytes) -> ParsedResponse:
        """Read the numeric output tensors of a response; errors are the upstream's (502)."""
        try:
            doc = _object(load_json(body))
            numeric: dict[str, NumericArray] = {}
            for t in _tensors(doc, "outputs", allow_empty=True):
                read = typed_data(t.data, t.shape, t.datatype, t.where)
                if read is not None:
                    numeric[t.name] = read
        except DialectError as exc:
            raise upstream_error(exc) from None
        return ParsedResponse(
            outputs={k: v.values for k, v in numeric.items()},
            doc=doc,
            dtypes={k: v.datatype for k, v in numeric.items()},
            layouts={k: v.layout for k, v in numeric.items()},
        )

    def serialize_response(
        self, parsed: ParsedResponse, outputs: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        """Write the replaced tensors' ``data`` in their original nesting; keep all else."""
        check_replacements(parsed, outputs)
        doc = _object(parsed.doc)
        if not outputs:
            return dump_json(doc)
        tensors = []
        for item in doc["outputs"]:
            name = item["name"]
            if name in outputs:
                data = encode_output(outputs[name], parsed.dtypes.get(name, "FP64"), name)
                layout = parsed.layouts.get(name, data.shape)
                item = {**item, "data": data.reshape(layout)}
            tensors.append(item)
        return dump_json({**doc, "outputs": tensors})


def binary_header_length(headers: Mapping[str, str] | None, body_length: int) -> int | None:
    """Return the JSON header's length from ``Inference-Header-Content-Length``, or None.

    A value that is not a decimal integer, or exceeds the body, is ``body_parse_error``: the body
    cannot be split into its JSON header and tensor bytes.
    """
    value = _header(headers, BINARY_HEADER)
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        raise DialectError("body_parse_error", f"{BINARY_HEADER} {value!r} is not an integer")
    length = int(value)
    if length > body_length:
        raise DialectError(
            "body_parse_error", f"{BINARY_HEADER} {length} exceeds the {body_length}-byte body"
        )
    return length


def is_binary_response(headers: Mapping[str, str] | None) -> bool:
    """Tell whether an answer carries binary tensors, which cannot be read or rewritten."""
    return _header(headers, BINARY_HEADER) is not None


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Return header ``name`` (lower case); names are compared case-insensitively as a fallback."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _parse_binary(body: bytes, length: int, max_instances: int) -> ParsedRequest:
    """Count a binary request from its JSON header and check the tensor bytes add up."""
    doc = _object(load_json(body[:length]))
    _refuse_out_of_body_outputs(doc, binary=True)
    tensors = _tensors(doc, "inputs", allow_empty=False, binary=True)
    count = _batch_size(tensors)
    check_batch(count, max_instances)
    declared = sum(t.binary_size for t in tensors if t.binary_size is not None)
    if declared != len(body) - length:
        raise DialectError(
            "invalid_input",
            f"binary tensors declare {declared} bytes but {len(body) - length} follow the header",
        )
    return ParsedRequest(count, {}, doc, binary=True)


def _batch_size(tensors: list[_Tensor]) -> int:
    """Return the first dimension every input shares."""
    firsts = {t.shape[0] for t in tensors}
    if len(firsts) != 1:
        raise DialectError(
            "invalid_input", f"inputs disagree on the batch dimension: {sorted(firsts)}"
        )
    return firsts.pop()


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DialectError("invalid_input", "body must be a JSON object")
    return doc


def _params(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise DialectError("invalid_input", f"{where}.parameters must be an object")
    return params


def _refuse_out_of_body_outputs(doc: Mapping[str, Any], *, binary: bool = False) -> None:
    """Refuse requests that ask for outputs outside the JSON body: they could not be protected.

    A ``binary`` request may ask for binary outputs (the route's policy decides on binary
    requests as a whole); shared-memory outputs are refused either way.
    """
    if not binary and _params(doc, "request").get("binary_data_output"):
        raise DialectError("unsupported_media", "binary_data_output is not supported", 415)
    requested = doc.get("outputs", [])
    if not isinstance(requested, list):
        raise DialectError("invalid_input", "outputs must be a list")
    for i, item in enumerate(requested):
        if not isinstance(item, dict):
            raise DialectError("invalid_input", f"outputs[{i}] must be an object")
        params = _params(item, f"outputs[{i}]")
        if (params.get("binary_data") and not binary) or "shared_memory_region" in params:
            raise DialectError(
                "unsupported_media", f"outputs[{i}]: binary or shared-memory output", 415
            )


def _tensors(
    doc: Mapping[str, Any], key: str, *, allow_empty: bool, binary: bool = False
) -> list[_Tensor]:
    """Read and check the tensor headers under ``key``; names must be unique."""
    items = doc.get(key)
    if not isinstance(items, list) or not (items or allow_empty):
        raise DialectError("invalid_input", f"{key} must be a non-empty list of tensors")
    tensors = [_tensor(item, f"{key}[{i}]", binary=binary) for i, item in enumerate(items)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise DialectError("invalid_input", f"{key}: tensor names must be unique")
    return tensors


def _tensor(item: object, where: str, *, binary: bool = False) -> _Tensor:
    if not isinstance(item, dict):
        raise DialectError("invalid_input", f"{where} must be an object")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str):
        raise DialectError("invalid_input", f"{where}.name must be a string")
    where = f"{where} ({name})"
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(dim) is int and dim >= 0 for dim in shape)
    ):
        raise DialectError(
            "invalid_input", f"{where}.shape must be a non-empty list of non-negative ints"
        )
    if not isinstance(datatype, str):
        raise DialectError("invalid_input", f"{where}.datatype must be a string")
    params = _params(item, where)
    if binary and "binary_data_size" in params and "shared_memory_region" not in params:
        size = _binary_size(params["binary_data_size"], tuple(shape), datatype, where)
        if "data" in item:
            raise DialectError("invalid_input", f"{where} has both data and binary_data_size")
        return _Tensor(name, tuple(shape), datatype, None, where, size)
    if any(key in params for key in _OUT_OF_BODY):
        raise DialectError("unsupported_media", f"{where}: tensor data outside the JSON body", 415)
    if "data" not in item:
        raise DialectError("invalid_input", f"{where} has no data")
    return _Tensor(name, tuple(shape), datatype, item["data"], where)


def _binary_size(size: object, shape: tuple[int, ...], datatype: str, where: str) -> int:
    """Check a binary tensor's byte size against its shape, so the count cannot understate it."""
    if type(size) is not int or size < 0:
        raise DialectError("invalid_input", f"{where}.binary_data_size must be a non-negative int")
    if datatype not in DATATYPES:
        raise DialectError("invalid_input", f"{where}: unknown datatype {datatype!r}")
    elements = math.prod(shape)
    if datatype in _ITEMSIZE:
        if size != elements * _ITEMSIZE[datatype]:
            raise DialectError(
                "invalid_input",
                f"{where}: {size} bytes do not hold shape {list(shape)} of {datatype}",
            )
    elif size < elements * _BYTES_PREFIX:
        raise DialectError(
            "invalid_input", f"{where}: {size} bytes cannot hold {elements} BYTES elements"
        )
    return size
