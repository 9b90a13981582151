"""Model API dialects: instance counts, numeric inputs/outputs, errors, response round trips."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from extauthz.dialects import (
    DIALECTS,
    DialectError,
    JsonPointerDialect,
    ParsedRequest,
    ParsedResponse,
    detect_dialect,
    dialect_for_route,
    ensure_json_media,
    get_dialect,
    is_binary_response,
)
from extauthz.dialects.oip_v2 import BINARY_HEADER as BINARY
from extauthz.policy.model import JsonPointers, Route

KSERVE = get_dialect("kserve_v1")
OIP = get_dialect("oip_v2")


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def error_of(call: Any, *args: Any, **kwargs: Any) -> DialectError:
    with pytest.raises(DialectError) as info:
        call(*args, **kwargs)
    return info.value


def oip_tensor(name: str, shape: list[int], datatype: str, data: object) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def oip_request(*tensors: dict[str, Any], **extra: Any) -> bytes:
    return body({"inputs": list(tensors), **extra})


class TestRegistry:
    """Dialects are found by name and by URL path; unknown names say which exist."""

    def test_get_dialect_by_name(self) -> None:
        assert get_dialect("kserve_v1").name == "kserve_v1"
        assert get_dialect("oip_v2").name == "oip_v2"
        assert get_dialect("openai").name == "openai"
        assert set(DIALECTS) == {"kserve_v1", "oip_v2", "openai"}

    def test_unknown_name_lists_known_ones(self) -> None:
        with pytest.raises(KeyError, match="kserve_v1, oip_v2, openai"):
            get_dialect("tensorflow")

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/v1/models/iris:predict", "kserve_v1"),
            ("/v1/models/iris:predict?debug=1", "kserve_v1"),
            ("/v2/models/iris/infer", "oip_v2"),
            ("/v2/models/iris/versions/3/infer", "oip_v2"),
            ("/v1/models/iris", None),
            ("/v1/models/iris:explain", None),
            ("/v1/models/a/b:predict", None),
            ("/v2/models/iris/ready", None),
            ("/v2/models/iris/infer/extra", None),
            ("/healthz", None),
        ],
    )
    def test_detect_by_path(self, path: str, expected: str | None) -> None:
        found = detect_dialect(path)
        assert (found.name if found else None) == expected


class TestBodyErrors:
    """Unreadable bodies are body_parse_error; non-finite numbers and wrong shapes invalid_input."""

    @pytest.mark.parametrize("dialect", [KSERVE, OIP], ids=lambda d: d.name)
    @pytest.mark.parametrize(
        "raw", [b"", b"{not json", b'{"instances": [1]} trailing', b"\xff\xfe{}", b'"\xed\xa0\x80"']
    )
    def test_unreadable_body(self, dialect: Any, raw: bytes) -> None:
        err = error_of(dialect.parse_request, raw, max_instances=10)
        assert (err.code, err.status) == ("body_parse_error", 400)

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"instances": [[1.0, NaN]]}',
            b'{"instances": [[1.0, Infinity]]}',
            b'{"instances": [[1.0, -Infinity]]}',
            b'{"instances": [[1.0, 1e400]]}',
            b'{"instances": [1], "meta": NaN}',
        ],
    )
    def test_non_finite_numbers(self, raw: bytes) -> None:
        err = error_of(KSERVE.parse_request, raw, max_instances=10)
        assert (err.code, err.status) == ("invalid_input", 400)

    def test_oip_non_finite(self) -> None:
        raw = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}'
        assert error_of(OIP.parse_request, raw, max_instances=10).code == "invalid_input"

    @pytest.mark.parametrize("doc", [[1, 2], "text", 3, None])
    def test_body_must_be_object(self, doc: object) -> None:
        for dialect in (KSERVE, OIP):
            err = error_of(dialect.parse_request, body(doc), max_instances=10)
            assert err.code == "invalid_input"

    def test_deep_nesting_is_refused(self) -> None:
        raw = b'{"instances": ' + b"[" * 2000 + b"]" * 2000 + b"}"
        err = error_of(KSERVE.parse_request, raw, max_instances=10)
        assert err.code == "body_parse_error"

    def test_nesting_beyond_numpy_dims_is_invalid(self) -> None:
        value: object = 1.0
        for _ in range(100):
            value = [value]
        err = error_of(KSERVE.parse_request, body({"instances": [value]}), max_instances=10)
        assert err.code == "invalid_input"


class TestMediaType:
    """Bodies declared as something other than UTF-8 JSON are unsupported_media (415)."""

    @pytest.mark.parametrize(
        "content_type",
        [None, "", "application/json", "application/json; charset=UTF-8", "application/vnd+json"],
    )
    def test_json_is_accepted(self, content_type: str | None) -> None:
        ensure_json_media(content_type)

    @pytest.mark.parametrize(
        "content_type",
        [
            "application/octet-stream",
            "multipart/form-data; boundary=x",
            "text/plain",
            "application/json; charset=latin-1",
        ],
    )
    def test_other_media_refused(self, content_type: str) -> None:
        err = error_of(ensure_json_media, content_type)
        assert (err.code, err.status) == ("unsupported_media", 415)


class TestKServeRequest:
    """KServe v1 requests count every instance and read numeric instances as float64 rows."""

    def test_rows_of_vectors(self) -> None:
        parsed = KSERVE.parse_request(
            body({"instances": [[1, 2.5, 3], [4, 5, 6]]}), max_instances=10
        )
        assert parsed.instances == 2
        x = parsed.inputs["instances"]
        assert x.dtype == np.float64 and x.shape == (2, 3)
        assert x[0, 1] == 2.5

    def test_scalar_instances(self) -> None:
        parsed = KSERVE.parse_request(body({"instances": [1, 2, 3]}), max_instances=10)
        assert parsed.instances == 3 and parsed.inputs["instances"].shape == (3,)

    def test_nested_rectangular_instances(self) -> None:
        image = np.arange(12.0).reshape(3, 2, 2)
        doc = {"instances": [image.tolist(), (image + 1).tolist()]}
        parsed = KSERVE.parse_request(body(doc), max_instances=10)
        assert parsed.inputs["instances"].shape == (2, 3, 2, 2)
        np.testing.assert_array_equal(parsed.inputs["instances"][1], image + 1)

    def test_object_instances_give_one_array_per_key(self) -> None:
        doc = {"instances": [{"a": [1, 2], "b": 3, "t": "x"}, {"a": [4, 5], "b": 6, "t": "y"}]}
        parsed = KSERVE.parse_request(body(doc), max_instances=10)
        assert parsed.instances == 2
        assert set(parsed.inputs) == {"a", "b"}  # text field counted, not converted
        assert parsed.inputs["a"].shape == (2, 2) and parsed.inputs["b"].tolist() == [3.0, 6.0]

    def test_text_instances_are_counted_not_converted(self) -> None:
        doc = {"instances": ["a long review", "another", "third"]}
        parsed = KSERVE.parse_request(body(doc), max_instances=10)
        assert parsed.instances == 3 and parsed.inputs == {}
        assert parsed.doc == doc

    def test_nulls_and_mixtures_are_not_numeric(self) -> None:
        parsed = KSERVE.parse_request(body({"instances": [[1, None], [2, "red"]]}), max_instances=9)
        assert parsed.instances == 2 and parsed.inputs == {}

    def test_booleans_read_as_zero_one(self) -> None:
        parsed = KSERVE.parse_request(body({"instances": [[True, False]]}), max_instances=9)
        assert parsed.inputs["instances"].tolist() == [[1.0, 0.0]]

    def test_ragged_rows_invalid(self) -> None:
        err = error_of(KSERVE.parse_request, body({"instances": [[1, 2], [3]]}), max_instances=9)
        assert err.code == "invalid_input" and "ragged" in err.message

    def test_objects_with_different_keys_invalid(self) -> None:
        doc = {"instances": [{"a": 1}, {"b": 2}]}
        assert error_of(KSERVE.parse_request, body(doc), max_instances=9).code == "invalid_input"

    def test_objects_mixed_with_values_invalid(self) -> None:
        doc = {"instances": [1, {"b": 2}]}
        assert error_of(KSERVE.parse_request, body(doc), max_instances=9).code == "invalid_input"

    @pytest.mark.parametrize(
        "doc",
        [
            {"instances": []},
            {"inputs": []},
            {"instances": 5},
            {"instances": {"a": 1}},
            {"other": [1]},
            {"instances": [1], "inputs": [1]},
        ],
    )
    def test_bad_shapes_invalid(self, doc: object) -> None:
        err = error_of(KSERVE.parse_request, body(doc), max_instances=9)
        assert (err.code, err.status) == ("invalid_input", 400)

    def test_too_many_instances(self) -> None:
        doc = {"instances": [[0.0]] * 65}
        err = error_of(KSERVE.parse_request, body(doc), max_instances=64)
        assert (err.code, err.status) == ("too_many_instances", 413)
        assert KSERVE.parse_request(body({"instances": [[0.0]] * 64}), max_instances=64)

    def test_column_form_counts_the_batch_axis(self) -> None:
        doc = {"inputs": {"x": [[1, 2], [3, 4], [5, 6]], "id": ["a", "b", "c"]}}
        parsed = KSERVE.parse_request(body(doc), max_instances=9)
        assert parsed.instances == 3 and set(parsed.inputs) == {"x"}
        assert parsed.inputs["x"].shape == (3, 2)
        plain = KSERVE.parse_request(body({"inputs": [[1.0], [2.0]]}), max_instances=9)
        assert plain.instances == 2 and plain.inputs["inputs"].shape == (2, 1)

    def test_column_form_batch_sizes_must_agree(self) -> None:
        doc = {"inputs": {"x": [[1, 2], [3, 4]], "y": [1]}}
        assert error_of(KSERVE.parse_request, body(doc), max_instances=9).code == "invalid_input"
        doc = {"inputs": {"x": 3}}
        assert error_of(KSERVE.parse_request, body(doc), max_instances=9).code == "invalid_input"

    def test_column_form_too_many(self) -> None:
        doc = {"inputs": {"x": [[1.0]] * 10}}
        assert error_of(KSERVE.parse_request, body(doc), max_instances=9).status == 413

    def test_long_strings_are_not_copied_per_element(self) -> None:
        # A fixed-width string array would need 200 000 x 20 000 x 4 bytes = 16 GB.
        doc = {"instances": ["x" * 200_000] + ["y"] * 20_000}
        parsed = KSERVE.parse_request(body(doc), max_instances=100_000)
        assert parsed.instances == 20_001 and parsed.inputs == {}


class TestKServeResponse:
    """KServe v1 responses expose numeric predictions and write replacements back in place."""

    def test_probability_rows(self) -> None:
        raw = body({"predictions": [[0.1, 0.9], [0.7, 0.3]]})
        parsed = KSERVE.parse_response(raw)
        assert parsed.outputs["predictions"].shape == (2, 2)

    def test_string_labels_are_not_outputs(self) -> None:
        parsed = KSERVE.parse_response(body({"predictions": ["cat", "dog"]}))
        assert parsed.outputs == {}
        assert json.loads(KSERVE.serialize_response(parsed, {})) == {"predictions": ["cat", "dog"]}

    def test_object_predictions_by_field(self) -> None:
        doc = {
            "predictions": [
                {"probabilities": [0.2, 0.8], "label": 1, "name": "dog"},
                {"probabilities": [0.6, 0.4], "label": 0, "name": "cat"},
            ]
        }
        parsed = KSERVE.parse_response(body(doc))
        assert set(parsed.outputs) == {"probabilities", "label"}
        assert parsed.dtypes["label"] == "INT64" and parsed.dtypes["probabilities"] == "FP64"

    def test_round_trip_keeps_other_fields_and_integers(self) -> None:
        doc = {
            "model_version": "7",
            "predictions": [
                {"probabilities": [0.2, 0.8], "label": 1, "name": "dog"},
                {"probabilities": [0.6, 0.4], "label": 0, "name": "cat"},
            ],
        }
        parsed = KSERVE.parse_response(body(doc))
        new_probs = np.array([[0.1, 0.9], [1 / 3, 2 / 3]])
        out = KSERVE.serialize_response(
            parsed, {"probabilities": new_probs, "label": np.array([1.2, 0.0])}
        )
        assert b" " not in out  # compact
        result = json.loads(out)
        assert result["model_version"] == "7"
        assert [p["name"] for p in result["predictions"]] == ["dog", "cat"]
        assert [p["label"] for p in result["predictions"]] == [1, 0]
        assert all(type(p["label"]) is int for p in result["predictions"])
        assert result["predictions"][1]["probabilities"] == [1 / 3, 2 / 3]
        assert doc == json.loads(body(parsed.doc))  # the parsed doc is not mutated

    def test_plain_rows_replaced(self) -> None:
        parsed = KSERVE.parse_response(body({"predictions": [[0.1, 0.9]], "id": "r1"}))
        out = json.loads(KSERVE.serialize_response(parsed, {"predictions": np.array([[0.0, 1.0]])}))
        assert out == {"predictions": [[0.0, 1.0]], "id": "r1"}

    def test_integer_predictions_stay_integers(self) -> None:
        parsed = KSERVE.parse_response(body({"predictions": [2, 0, 1]}))
        out = KSERVE.serialize_response(parsed, {"predictions": np.array([0.0, 1.0, 2.0])})
        assert out == b'{"predictions":[0,1,2]}'

    def test_unsigned_64_bit_integers_do_not_wrap(self) -> None:
        big = 2**64 - 1
        parsed = KSERVE.parse_response(body({"predictions": [big, 1]}))
        assert parsed.dtypes["predictions"] == "UINT64"
        out = KSERVE.serialize_response(parsed, {"predictions": parsed.outputs["predictions"]})
        assert json.loads(out)["predictions"][1] == 1 and json.loads(out)["predictions"][0] > 2**63

    def test_booleans_stay_booleans(self) -> None:
        parsed = KSERVE.parse_response(body({"predictions": [[True, False]]}))
        out = KSERVE.serialize_response(parsed, {"predictions": np.array([[0.0, 1.0]])})
        assert out == b'{"predictions":[[false,true]]}'

    def test_column_outputs(self) -> None:
        doc = {"outputs": {"scores": [[0.5, 0.5], [0.9, 0.1]], "classes": ["a", "b"]}}
        parsed = KSERVE.parse_response(body(doc))
        assert set(parsed.outputs) == {"scores"}
        out = json.loads(KSERVE.serialize_response(parsed, {"scores": np.ones((2, 2))}))
        assert out == {"outputs": {"scores": [[1.0, 1.0], [1.0, 1.0]], "classes": ["a", "b"]}}

    def test_bad_replacements_raise(self) -> None:
        parsed = KSERVE.parse_response(body({"predictions": [[0.1, 0.9]]}))
        with pytest.raises(ValueError, match="unknown output"):
            KSERVE.serialize_response(parsed, {"logits": np.zeros((1, 2))})
        with pytest.raises(ValueError, match="shape"):
            KSERVE.serialize_response(parsed, {"predictions": np.zeros((1, 3))})
        with pytest.raises(ValueError, match="non-finite"):
            KSERVE.serialize_response(parsed, {"predictions": np.array([[np.nan, 1.0]])})

    @pytest.mark.parametrize(
        "raw",
        [b"not json", b'{"predictions": [[1, 2], [3]]}', b'{"result": 1}', b'{"predictions": 1}'],
    )
    def test_bad_responses_are_upstream_errors(self, raw: bytes) -> None:
        err = error_of(KSERVE.parse_response, raw)
        assert err.status == 502 and err.code in {"body_parse_error", "invalid_input"}


class TestOipRequest:
    """Open Inference v2 requests: count the shared first dimension, check shape and datatype."""

    def test_count_and_shapes(self) -> None:
        raw = oip_request(
            oip_tensor("x", [3, 2], "FP32", [1, 2, 3, 4, 5, 6]),
            oip_tensor("mask", [3], "BOOL", [True, False, True]),
            id="req-1",
        )
        parsed = OIP.parse_request(raw, max_instances=8)
        assert parsed.instances == 3
        assert parsed.inputs["x"].shape == (3, 2) and parsed.inputs["x"].dtype == np.float64
        assert parsed.inputs["mask"].tolist() == [1.0, 0.0, 1.0]
        assert isinstance(parsed.doc, dict) and parsed.doc["id"] == "req-1"

    def test_flat_and_nested_data_agree(self) -> None:
        flat = OIP.parse_request(
            oip_request(oip_tensor("x", [2, 2, 2], "FP64", list(range(8)))), max_instances=8
        )
        nested = OIP.parse_request(
            oip_request(oip_tensor("x", [2, 2, 2], "FP64", [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])),
            max_instances=8,
        )
        np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
        assert flat.inputs["x"][1, 0, 1] == 5.0

    def test_bytes_counted_not_converted(self) -> None:
        raw = oip_request(oip_tensor("text", [2], "BYTES", ["hello", "world"]))
        parsed = OIP.parse_request(raw, max_instances=8)
        assert parsed.instances == 2 and parsed.inputs == {}

    @pytest.mark.parametrize(
        ("datatype", "data"),
        [
            ("INT8", [1, 128]),
            ("INT8", [-129, 0]),
            ("UINT8", [-1, 0]),
            ("UINT16", [65536, 0]),
            ("INT32", [1.5, 2]),
            ("INT64", [True, False]),
            ("BOOL", [1, 0]),
            ("FP32", [True, 1.0]),
            ("FP32", ["1.0", 2.0]),
            ("FP16", [70000.0, 1.0]),
            ("BYTES", [1, 2]),
            ("FP8", [1.0, 2.0]),
            ("FP32", [1.0, None]),
        ],
    )
    def test_wrong_datatype_invalid(self, datatype: str, data: list[object]) -> None:
        err = error_of(
            OIP.parse_request, oip_request(oip_tensor("x", [2], datatype, data)), max_instances=8
        )
        assert (err.code, err.status) == ("invalid_input", 400)

    @pytest.mark.parametrize(
        ("datatype", "data", "expected"),
        [
            ("INT8", [-128, 127], [-128.0, 127.0]),
            ("UINT8", [0, 255], [0.0, 255.0]),
            ("UINT64", [2**64 - 1, 0], [float(2**64 - 1), 0.0]),
            ("INT64", [-(2**63), 2**63 - 1], [-(2.0**63), 2.0**63]),
            ("FP16", [65504, -1], [65504.0, -1.0]),
        ],
    )
    def test_integer_and_edge_ranges_accepted(
        self, datatype: str, data: list[object], expected: list[float]
    ) -> None:
        parsed = OIP.parse_request(
            oip_request(oip_tensor("x", [2], datatype, data)), max_instances=8
        )
        assert parsed.inputs["x"].tolist() == expected

    @pytest.mark.parametrize(
        "tensors",
        [
            [oip_tensor("x", [2, 2], "FP32", [1, 2, 3])],
            [oip_tensor("x", [2, 2], "FP32", [[1, 2], [3]])],
            [oip_tensor("x", [2], "FP32", [1, 2]), oip_tensor("y", [3], "FP32", [1, 2, 3])],
            [oip_tensor("x", [], "FP32", [1])],
            [oip_tensor("x", [2, -1], "FP32", [1, 2])],
            [oip_tensor("x", [2, True], "FP32", [1, 2])],
            [oip_tensor("x", [1], "FP32", [1]), oip_tensor("x", [1], "FP32", [2])],
            [{"name": "x", "shape": [1], "datatype": "FP32"}],
            [{"shape": [1], "datatype": "FP32", "data": [1]}],
            [oip_tensor("x", [0, 3], "FP32", [])],
            [],
        ],
    )
    def test_bad_tensors_invalid(self, tensors: list[dict[str, Any]]) -> None:
        err = error_of(OIP.parse_request, oip_request(*tensors), max_instances=8)
        assert (err.code, err.status) == ("invalid_input", 400)

    def test_too_many_instances(self) -> None:
        raw = oip_request(oip_tensor("x", [9, 1], "FP32", [0.0] * 9))
        err = error_of(OIP.parse_request, raw, max_instances=8)
        assert (err.code, err.status) == ("too_many_instances", 413)

    @pytest.mark.parametrize(
        "extra",
        [
            {"parameters": {"binary_data_output": True}},
            {"outputs": [{"name": "probs", "parameters": {"binary_data": True}}]},
            {"outputs": [{"name": "probs", "parameters": {"shared_memory_region": "r"}}]},
        ],
    )
    def test_out_of_body_outputs_refused(self, extra: dict[str, Any]) -> None:
        raw = oip_request(oip_tensor("x", [1], "FP32", [1.0]), **extra)
        err = error_of(OIP.parse_request, raw, max_instances=8)
        assert (err.code, err.status) == ("unsupported_media", 415)

    def test_out_of_body_inputs_refused(self) -> None:
        tensor = oip_tensor("x", [1], "FP32", [])
        tensor["parameters"] = {"binary_data_size": 4}
        err = error_of(OIP.parse_request, oip_request(tensor), max_instances=8)
        assert (err.code, err.status) == ("unsupported_media", 415)

    def test_requested_json_outputs_allowed(self) -> None:
        raw = oip_request(
            oip_tensor("x", [1], "FP32", [1.0]),
            outputs=[{"name": "probs", "parameters": {"binary_data": False}}],
        )
        assert OIP.parse_request(raw, max_instances=8).instances == 1


def binary_request(
    tensors: list[dict[str, Any]], payload: bytes, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """Return an OIP binary-extension body (JSON header, then raw bytes) and its headers."""
    header = json.dumps({"inputs": tensors, **extra}).encode()
    return header + payload, {"inference-header-content-length": str(len(header))}


def binary_tensor(name: str, shape: list[int], datatype: str, size: int) -> dict[str, Any]:
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


class TestOipBinaryRequest:
    """Binary tensors are counted from the JSON header's shapes and marked binary, no inputs."""

    def test_count_from_shapes(self) -> None:
        payload = np.zeros((5, 3), np.float32).tobytes()
        raw, headers = binary_request([binary_tensor("x", [5, 3], "FP32", len(payload))], payload)
        parsed = OIP.parse_request(raw, max_instances=8, headers=headers)
        assert (parsed.instances, parsed.inputs, parsed.binary) == (5, {}, True)
        assert parsed.doc["inputs"][0]["name"] == "x"  # type: ignore[index]

    def test_json_and_binary_tensors_mix(self) -> None:
        payload = np.zeros((2, 2), np.int64).tobytes()
        tensors = [
            binary_tensor("a", [2, 2], "INT64", len(payload)),
            oip_tensor("b", [2], "FP32", [1.0, 2.0]),
        ]
        raw, headers = binary_request(tensors, payload)
        parsed = OIP.parse_request(raw, max_instances=8, headers=headers)
        assert (parsed.instances, parsed.inputs, parsed.binary) == (2, {}, True)

    def test_bytes_tensors_need_their_length_prefixes(self) -> None:
        payload = b"".join(len(t).to_bytes(4, "little") + t for t in (b"hi", b"there"))
        raw, headers = binary_request([binary_tensor("t", [2], "BYTES", len(payload))], payload)
        assert OIP.parse_request(raw, max_instances=8, headers=headers).instances == 2
        raw, headers = binary_request([binary_tensor("t", [3], "BYTES", 8)], b"\0" * 8)
        assert error_of(OIP.parse_request, raw, max_instances=8, headers=headers).code == (
            "invalid_input"
        )

    def test_binary_outputs_may_be_requested(self) -> None:
        payload = np.zeros(1, np.float32).tobytes()
        raw, headers = binary_request(
            [binary_tensor("x", [1], "FP32", 4)],
            payload,
            parameters={"binary_data_output": True},
            outputs=[{"name": "p", "parameters": {"binary_data": True}}],
        )
        assert OIP.parse_request(raw, max_instances=8, headers=headers).binary

    def test_too_many_instances(self) -> None:
        payload = np.zeros(9, np.float32).tobytes()
        raw, headers = binary_request([binary_tensor("x", [9], "FP32", 36)], payload)
        err = error_of(OIP.parse_request, raw, max_instances=8, headers=headers)
        assert (err.code, err.status) == ("too_many_instances", 413)

    def test_shapes_must_agree(self) -> None:
        tensors = [binary_tensor("a", [2], "FP32", 8), binary_tensor("b", [3], "FP32", 12)]
        raw, headers = binary_request(tensors, bytes(20))
        assert error_of(OIP.parse_request, raw, max_instances=8, headers=headers).code == (
            "invalid_input"
        )

    @pytest.mark.parametrize(
        ("tensor", "payload"),
        [
            (binary_tensor("x", [1, 4], "FP32", 8), bytes(8)),  # size understates the shape
            (binary_tensor("x", [2], "FP32", 8), bytes(12)),  # more bytes than declared
            (binary_tensor("x", [2], "FP32", 8), bytes(4)),  # fewer bytes than declared
            (binary_tensor("x", [2], "FP32", -8), bytes(0)),
            (binary_tensor("x", [2], "FP32", "8"), bytes(8)),  # type: ignore[arg-type]
            (binary_tensor("x", [2], "FP99", 8), bytes(8)),
            ({**binary_tensor("x", [2], "FP32", 8), "data": [1.0, 2.0]}, bytes(8)),
        ],
        ids=["understated", "extra-bytes", "short", "negative", "text-size", "dtype", "both"],
    )
    def test_inconsistent_sizes_are_invalid(self, tensor: dict[str, Any], payload: bytes) -> None:
        raw, headers = binary_request([tensor], payload)
        err = error_of(OIP.parse_request, raw, max_instances=8, headers=headers)
        assert (err.code, err.status) == ("invalid_input", 400)

    def test_shared_memory_still_refused(self) -> None:
        tensor = binary_tensor("x", [1], "FP32", 4)
        tensor["parameters"]["shared_memory_region"] = "r"
        raw, headers = binary_request([tensor], bytes(4))
        err = error_of(OIP.parse_request, raw, max_instances=8, headers=headers)
        assert (err.code, err.status) == ("unsupported_media", 415)

    @pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "12,12", "²", "100000"])
    def test_bad_header_is_a_parse_error(self, value: str) -> None:
        raw, _ = binary_request([binary_tensor("x", [1], "FP32", 4)], bytes(4))
        headers = {"inference-header-content-length": value}
        err = error_of(OIP.parse_request, raw, max_instances=8, headers=headers)
        assert (err.code, err.status) == ("body_parse_error", 400)

    def test_header_must_split_at_the_json(self) -> None:
        raw, headers = binary_request([binary_tensor("x", [1], "FP32", 4)], bytes(4))
        short = {"inference-header-content-length": str(int(headers[BINARY]) - 1)}
        assert error_of(OIP.parse_request, raw, max_instances=8, headers=short).code == (
            "body_parse_error"
        )

    def test_header_name_is_case_insensitive(self) -> None:
        raw, headers = binary_request([binary_tensor("x", [1], "FP32", 4)], bytes(4))
        mixed = {"Inference-Header-Content-Length": headers[BINARY]}
        assert OIP.parse_request(raw, max_instances=8, headers=mixed).binary

    def test_without_the_header_binary_inputs_are_refused_as_before(self) -> None:
        raw, _ = binary_request([binary_tensor("x", [1], "FP32", 4)], b"")
        err = error_of(OIP.parse_request, raw, max_instances=8, headers={"x-other": "1"})
        assert (err.code, err.status) == ("unsupported_media", 415)

    @pytest.mark.parametrize("name", ["kserve_v1", "openai"])
    def test_other_dialects_ignore_headers(self, name: str) -> None:
        doc = {"instances": [[1.0]]} if name == "kserve_v1" else {"prompt": "hi"}
        headers = {BINARY: "2"}
        assert (
            get_dialect(name).parse_request(body(doc), max_instances=8, headers=headers).instances
            == 1
        )

    def test_binary_response_detection(self) -> None:
        assert is_binary_response({BINARY: "120"})
        assert is_binary_response({"Inference-Header-Content-Length": "120"})
        assert not is_binary_response({"content-type": "application/json"})
        assert not is_binary_response({})


class TestDialectForRoute:
    """A route names its dialect, gets a cached pointer dialect, or None for auto-detection."""

    @pytest.mark.parametrize("name", ["kserve_v1", "oip_v2", "openai"])
    def test_named(self, name: str) -> None:
        assert dialect_for_route(Route(prefix="/m", dialect=name)) is DIALECTS[name]  # type: ignore[arg-type]

    def test_auto_is_none(self) -> None:
        assert dialect_for_route(Route(prefix="/m")) is None

    def test_jsonpointer_is_built_and_cached_per_pointers(self) -> None:
        pointers = JsonPointers(inputs=("/rows",), outputs=("/scores",))
        first = dialect_for_route(Route(prefix="/a", dialect="jsonpointer", pointers=pointers))
        again = dialect_for_route(
            Route(
                prefix="/b",
                dialect="jsonpointer",
                pointers=JsonPointers(inputs=("/rows",), outputs=("/scores",)),
            )
        )
        other = dialect_for_route(
            Route(
                prefix="/c",
                dialect="jsonpointer",
                pointers=JsonPointers(inputs=("/rows",), outputs=("/probs",)),
            )
        )
        assert isinstance(first, JsonPointerDialect)
        assert first is again
        assert other is not first
        assert first.parse_request(b'{"rows": [1, 2]}', max_instances=8).instances == 2

    def test_bad_pointer_raises_value_error(self) -> None:
        pointers = JsonPointers(inputs=("/a~2",), outputs=())
        with pytest.raises(ValueError, match="'~'"):
            dialect_for_route(Route(prefix="/a", dialect="jsonpointer", pointers=pointers))

    def test_jsonpointer_is_not_a_registered_name(self) -> None:
        with pytest.raises(KeyError):
            get_dialect("jsonpointer")


def oip_response(*outputs: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": "m", "model_version": "1", "id": "r", "outputs": list(outputs)}


class TestOipResponse:
    """Open Inference v2 responses keep their nesting, datatypes and every other field."""

    def test_flat_data_stays_flat(self) -> None:
        doc = oip_response(oip_tensor("probs", [2, 2], "FP32", [0.1, 0.9, 0.4, 0.6]))
        parsed = OIP.parse_response(body(doc))
        assert parsed.outputs["probs"].shape == (2, 2)
        new = np.array([[0.2, 0.8], [0.5, 0.5]])
        out = json.loads(OIP.serialize_response(parsed, {"probs": new}))
        assert out == {**doc, "outputs": [{**doc["outputs"][0], "data": [0.2, 0.8, 0.5, 0.5]}]}

    def test_nested_data_stays_nested(self) -> None:
        doc = oip_response(oip_tensor("probs", [2, 2], "FP32", [[0.1, 0.9], [0.4, 0.6]]))
        parsed = OIP.parse_response(body(doc))
        out = json.loads(OIP.serialize_response(parsed, {"probs": np.eye(2)}))
        assert out["outputs"][0]["data"] == [[1.0, 0.0], [0.0, 1.0]]

    def test_integer_outputs_stay_integers_within_range(self) -> None:
        doc = oip_response(
            oip_tensor("label", [3], "UINT8", [1, 2, 3]),
            oip_tensor("text", [3], "BYTES", ["a", "b", "c"]),
            oip_tensor("ok", [3], "BOOL", [True, True, False]),
        )
        parsed = OIP.parse_response(body(doc))
        assert set(parsed.outputs) == {"label", "ok"}
        out = OIP.serialize_response(
            parsed, {"label": np.array([0.4, 300.0, -5.0]), "ok": np.array([0.0, 1.0, 1.0])}
        )
        result = json.loads(out)
        assert result["outputs"][0]["data"] == [0, 255, 0]
        assert result["outputs"][1] == doc["outputs"][1]
        assert result["outputs"][2]["data"] == [False, True, True]
        assert b'"data":[0,255,0]' in out

    def test_untouched_outputs_are_byte_identical(self) -> None:
        doc = oip_response(
            oip_tensor("a", [1, 2], "FP32", [0.1, 0.9]),
            oip_tensor("b", [1], "INT64", [2**53 + 1]),
        )
        parsed = OIP.parse_response(body(doc))
        out = json.loads(OIP.serialize_response(parsed, {"a": np.array([[0.3, 0.7]])}))
        assert out["outputs"][1]["data"] == [2**53 + 1]

    @pytest.mark.parametrize(
        "doc",
        [
            {"outputs": [oip_tensor("p", [2], "FP32", [0.1])]},
            {"outputs": [oip_tensor("p", [], "FP32", [0.1])]},
            {"outputs": {"p": [1]}},
            {"outputs": [oip_tensor("p", [1], "INT32", [0.5])]},
        ],
    )
    def test_bad_responses_are_upstream_errors(self, doc: object) -> None:
        err = error_of(OIP.parse_response, body(doc))
        assert (err.code, err.status) == ("invalid_input", 502)

    def test_binary_response_tensor_refused(self) -> None:
        tensor = {**oip_tensor("p", [1], "FP32", []), "parameters": {"binary_data_size": 4}}
        err = error_of(OIP.parse_response, body(oip_response(tensor)))
        assert err.code == "unsupported_media"


class TestInputMatrix:
    """The input matrix joins every numeric input into one row per instance, names sorted."""

    def test_concatenates_by_sorted_name(self) -> None:
        doc = {"instances": [{"b": [1, 2], "a": 0, "t": "x"}, {"b": [3, 4], "a": 9, "t": "y"}]}
        parsed = KSERVE.parse_request(body(doc), max_instances=9)
        matrix = parsed.input_matrix()
        assert matrix is not None
        assert matrix.tolist() == [[0.0, 1.0, 2.0], [9.0, 3.0, 4.0]]

    def test_none_without_numeric_inputs(self) -> None:
        parsed = ParsedRequest(instances=2, inputs={}, doc={"instances": ["a", "b"]})
        assert parsed.input_matrix() is None


# --- round-trip property --------------------------------------------------------------------

_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
_ints = st.integers(min_value=-(2**53), max_value=2**53)
_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)
_float_arrays = hnp.arrays(np.float64, _shapes, elements=_floats)


def _same(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    # Compare bit patterns so that -0.0 and 0.0 count as different.
    return a.shape == b.shape and bool((a.view(np.int64) == b.view(np.int64)).all())


def _reparse(dialect: Any, parsed: ParsedResponse, outputs: dict[str, Any]) -> ParsedResponse:
    result: ParsedResponse = dialect.parse_response(dialect.serialize_response(parsed, outputs))
    return result


class TestRoundTrip:
    """Random rectangular outputs survive parse -> serialize -> parse exactly (repr floats)."""

    @settings(max_examples=60, deadline=None)
    @given(original=_float_arrays, replacement_seed=st.integers(0, 2**32 - 1))
    def test_kserve_rows(self, original: npt.NDArray[np.float64], replacement_seed: int) -> None:
        doc = {"predictions": original.tolist(), "model": "m"}
        parsed = KSERVE.parse_response(body(doc))
        assert _same(parsed.outputs["predictions"], original)
        # Unchanged outputs serialize to the same document.
        assert json.loads(KSERVE.serialize_response(parsed, parsed.outputs)) == doc
        # Replaced outputs come back exactly, other fields intact.
        rng = np.random.default_rng(replacement_seed)
        new = rng.standard_normal(original.shape) * 10.0 ** rng.integers(-300, 300)
        again = _reparse(KSERVE, parsed, {"predictions": new})
        assert _same(again.outputs["predictions"], new)
        assert isinstance(again.doc, dict) and again.doc["model"] == "m"

    @settings(max_examples=40, deadline=None)
    @given(
        probs=hnp.arrays(
            np.float64, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=_floats
        ),
        labels=st.data(),
    )
    def test_kserve_objects(self, probs: npt.NDArray[np.float64], labels: st.DataObject) -> None:
        n = probs.shape[0]
        label = labels.draw(st.lists(_ints, min_size=n, max_size=n))
        doc = {
            "predictions": [
                {"p": p, "label": k} for p, k in zip(probs.tolist(), label, strict=True)
            ]
        }
        parsed = KSERVE.parse_response(body(doc))
        assert json.loads(KSERVE.serialize_response(parsed, dict(parsed.outputs))) == doc

    @settings(max_examples=60, deadline=None)
    @given(original=_float_arrays, nested=st.booleans(), datatype=st.sampled_from(["FP32", "FP64"]))
    def test_oip_float_tensors(
        self, original: npt.NDArray[np.float64], nested: bool, datatype: str
    ) -> None:
        if datatype == "FP32":
            original = np.clip(original, -3e38, 3e38)
        data = original.tolist() if nested else original.ravel().tolist()
        doc = oip_response(oip_tensor("y", list(original.shape), datatype, data))
        parsed = OIP.parse_response(body(doc))
        assert _same(parsed.outputs["y"], original)
        assert json.loads(OIP.serialize_response(parsed, dict(parsed.outputs))) == doc

    @settings(max_examples=40, deadline=None)
    @given(original=hnp.arrays(np.int64, _shapes, elements=_ints), nested=st.booleans())
    def test_oip_int_tensors(self, original: npt.NDArray[np.int64], nested: bool) -> None:
        data = original.tolist() if nested else original.ravel().tolist()
        doc = oip_response(oip_tensor("k", list(original.shape), "INT64", data))
        parsed = OIP.parse_response(body(doc))
        out = json.loads(OIP.serialize_response(parsed, dict(parsed.outputs)))
        assert out == doc
        assert all(type(v) is int for v in np.asarray(out["outputs"][0]["data"]).ravel().tolist())


class TestLargeBatch:
    """A ~2 MB KServe batch of 64-float rows parses and is counted in full."""

    def test_two_megabyte_batch(self) -> None:
        rows = np.random.default_rng(7).random((1600, 64))
        raw = body({"instances": rows.tolist()})
        assert len(raw) > 2_000_000
        parsed = KSERVE.parse_request(raw, max_instances=10_000)
        assert parsed.instances == 1600
        np.testing.assert_array_equal(parsed.inputs["instances"], rows)
