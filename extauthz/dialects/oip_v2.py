"""Open Inference Protocol v2 (KServe v2, Triton): ``POST /v2/models/{name}[/versions/{v}]/infer``.

Each input and output is a tensor ``{"name", "shape", "datatype", "data"}``; ``data`` is flat or
nested, row-major, and must fill ``shape``. The instance count is the first dimension, which
every input must share. ``BYTES`` tensors are checked and counted but not converted.

Tensors that do not travel in the JSON body (the binary data extension, shared memory) cannot be
counted or protected, so requests asking for them are refused with ``unsupported_media`` (415).
Rewritten outputs are written back in the nesting they came in: flat stays flat, nested stays
nested.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy.typing as npt

from extauthz.dialects.base import (
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

__all__ = ["OipV2Dialect"]

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


class OipV2Dialect:
    """Parse and re-serialize Open Inference Protocol v2 JSON bodies."""

    __slots__ = ()
    name: str = "oip_v2"

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` is ``/v2/models/{name}[/versions/{v}]/infer``."""
        return _PATH.fullmatch(path.partition("?")[0]) is not None

    def parse_request(self, body: bytes, *, max_instances: int) -> ParsedRequest:
        """Count the instances (shared first dimension) and read the numeric input tensors."""
        doc = _object(load_json(body))
        _refuse_out_of_body_outputs(doc)
        tensors = _tensors(doc, "inputs", allow_empty=False)
        firsts = {t.shape[0] for t in tensors}
        if len(firsts) != 1:
            raise DialectError(
                "invalid_input", f"inputs disagree on the batch dimension: {sorted(firsts)}"
            )
        count = firsts.pop()
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


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DialectError("invalid_input", "body must be a JSON object")
    return doc


def _params(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise DialectError("invalid_input", f"{where}.parameters must be an object")
    return params


def _refuse_out_of_body_outputs(doc: Mapping[str, Any]) -> None:
    """Refuse requests that ask for outputs outside the JSON body: they could not be protected."""
    if _params(doc, "request").get("binary_data_output"):
        raise DialectError("unsupported_media", "binary_data_output is not supported", 415)
    requested = doc.get("outputs", [])
    if not isinstance(requested, list):
        raise DialectError("invalid_input", "outputs must be a list")
    for i, item in enumerate(requested):
        if not isinstance(item, dict):
            raise DialectError("invalid_input", f"outputs[{i}] must be an object")
        params = _params(item, f"outputs[{i}]")
        if params.get("binary_data") or "shared_memory_region" in params:
            raise DialectError(
                "unsupported_media", f"outputs[{i}]: binary or shared-memory output", 415
            )


def _tensors(doc: Mapping[str, Any], key: str, *, allow_empty: bool) -> list[_Tensor]:
    """Read and check the tensor headers under ``key``; names must be unique."""
    items = doc.get(key)
    if not isinstance(items, list) or not (items or allow_empty):
        raise DialectError("invalid_input", f"{key} must be a non-empty list of tensors")
    tensors = [_tensor(item, f"{key}[{i}]") for i, item in enumerate(items)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise DialectError("invalid_input", f"{key}: tensor names must be unique")
    return tensors


def _tensor(item: object, where: str) -> _Tensor:
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
    if any(key in params for key in _OUT_OF_BODY):
        raise DialectError("unsupported_media", f"{where}: tensor data outside the JSON body", 415)
    if "data" not in item:
        raise DialectError("invalid_input", f"{where} has no data")
    return _Tensor(name, tuple(shape), datatype, item["data"], where)
