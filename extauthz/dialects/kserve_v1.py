"""KServe v1 (TensorFlow Serving) prediction protocol: ``POST /v1/models/{name}:predict``.

Requests come in the row form ``{"instances": [...]}`` or the column form ``{"inputs": ...}``;
responses as ``{"predictions": [...]}`` or ``{"outputs": ...}``. An instance (or prediction) is a
number, a rectangular nested list, or an object whose fields are such values; all objects in a
batch must share their keys. Text and other non-numeric values are counted but not converted.

Names: a plain row batch is ``instances`` / ``predictions``, a plain column batch ``inputs`` /
``outputs``, and object rows or named columns take their field names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from extauthz.dialects.base import (
    DialectError,
    NumericArray,
    ParsedRequest,
    ParsedResponse,
    as_numeric,
    check_batch,
    check_replacements,
    dump_json,
    encode_output,
    load_json,
    upstream_error,
)

__all__ = ["KServeV1Dialect"]

_PATH: Final = re.compile(r"/v1/models/[^/]+:predict")


class KServeV1Dialect:
    """Parse and re-serialize KServe v1 / TF Serving bodies."""

    __slots__ = ()
    name: str = "kserve_v1"

    def matches(self, path: str) -> bool:
        """Tell whether ``path`` is ``/v1/models/{name}:predict`` (query string ignored)."""
        return _PATH.fullmatch(path.partition("?")[0]) is not None

    def parse_request(
        self, body: bytes, *, max_instances: int, headers: Mapping[str, str] | None = None
    ) -> ParsedRequest:
        """Count the instances of a row or column request and read its numeric inputs.

        ``headers`` is ignored: KServe v1 bodies are always JSON.
        """
        doc = _object(load_json(body))
        rows, columns = _pick(doc, "instances", "inputs")
        if rows is not None:
            items = _batch_list(rows, "instances")
            check_batch(len(items), max_instances)
            numeric = _rows(items, "instances")
            count = len(items)
        else:
            count = _column_count(columns, "inputs")
            check_batch(count, max_instances)
            numeric = _columns(columns, "inputs")
        return ParsedRequest(count, {k: v.values for k, v in numeric.items()}, doc)

    def parse_response(self, body: bytes) -> ParsedResponse:
        """Read the numeric predictions (or outputs) of a response; errors are the upstream's."""
        try:
            doc = _object(load_json(body))
            rows, columns = _pick(doc, "predictions", "outputs")
            if rows is not None:
                numeric = _rows(_batch_list(rows, "predictions"), "predictions", responses=True)
            else:
                _column_count(columns, "outputs")
                numeric = _columns(columns, "outputs", responses=True)
        except DialectError as exc:
            raise upstream_error(exc) from None
        return ParsedResponse(
            outputs={k: v.values for k, v in numeric.items()},
            doc=doc,
            dtypes={k: v.datatype for k, v in numeric.items()},
        )

    def serialize_response(
        self, parsed: ParsedResponse, outputs: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        """Write the replaced outputs back where they were read; keep every other field."""
        check_replacements(parsed, outputs)
        if not outputs:
            return dump_json(parsed.doc)
        doc = _object(parsed.doc)
        key = "predictions" if "predictions" in doc else "outputs"
        encoded = {
            name: encode_output(values, parsed.dtypes.get(name, "FP64"), name)
            for name, values in outputs.items()
        }
        value = doc[key]
        new: object
        if isinstance(value, dict):
            new = {**value, **encoded}
        elif value and isinstance(value[0], dict):
            new = [dict(item) for item in value]
            for name, array in encoded.items():
                for item, cell in zip(new, array.tolist(), strict=True):
                    item[name] = cell
        else:
            new = encoded[key]
        return dump_json({**doc, key: new})


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DialectError("invalid_input", "body must be a JSON object")
    return doc


def _pick(doc: dict[str, Any], row_key: str, column_key: str) -> tuple[object, object]:
    """Return (rows, columns), exactly one of them present."""
    if row_key in doc and column_key in doc:
        raise DialectError("invalid_input", f"both {row_key!r} and {column_key!r} given")
    if row_key in doc:
        return doc[row_key], None
    if column_key in doc:
        return None, doc[column_key]
    raise DialectError("invalid_input", f"body has neither {row_key!r} nor {column_key!r}")


def _batch_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DialectError("invalid_input", f"{where} must be a list")
    return value


def _rows(items: list[Any], name: str, *, responses: bool = False) -> dict[str, NumericArray]:
    """Read a row batch: plain values under ``name``, or object rows field by field."""
    if items and isinstance(items[0], dict):
        keys = items[0].keys()
        if not all(isinstance(item, dict) and item.keys() == keys for item in items):
            raise DialectError("invalid_input", f"{name}: objects must all have the same keys")
        columns = {key: [item[key] for item in items] for key in keys}
        return _numeric_fields(columns, name, responses)
    if any(isinstance(item, dict) for item in items):
        raise DialectError("invalid_input", f"{name}: objects mixed with plain values")
    numeric = as_numeric(items, name, integer_range=responses)
    return {} if numeric is None else {name: numeric}


def _column_count(columns: object, where: str) -> int:
    """Return the batch size of a column batch: the shared length of its lists."""
    if isinstance(columns, list):
        return len(columns)
    if not isinstance(columns, dict) or not columns:
        raise DialectError("invalid_input", f"{where} must be a list or a non-empty object")
    lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
    if -1 in lengths:
        raise DialectError("invalid_input", f"{where}: every named input must be a batch list")
    if len(lengths) != 1:
        raise DialectError("invalid_input", f"{where}: named inputs disagree on the batch size")
    return lengths.pop()


def _columns(columns: object, name: str, *, responses: bool = False) -> dict[str, NumericArray]:
    if isinstance(columns, list):
        return _rows(columns, name, responses=responses)
    assert isinstance(columns, dict)  # _column_count checked the form
    return _numeric_fields(columns, name, responses)


def _numeric_fields(
    columns: Mapping[str, object], where: str, responses: bool
) -> dict[str, NumericArray]:
    out: dict[str, NumericArray] = {}
    for key, column in columns.items():
        numeric = as_numeric(column, f"{where}.{key}", integer_range=responses)
        if numeric is not None:
            out[key] = numeric
    return out
