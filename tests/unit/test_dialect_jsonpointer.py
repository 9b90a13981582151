"""The JSON pointer dialect: RFC 6901 pointers, counting, numeric inputs, output round trips."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from extauthz.dialects import DialectError
from extauthz.dialects.jsonpointer import JsonPointerDialect, parse_pointer, resolve


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def error_of(dialect: JsonPointerDialect, doc: object, max_instances: int = 100) -> DialectError:
    raw = doc if isinstance(doc, bytes) else body(doc)
    with pytest.raises(DialectError) as info:
        dialect.parse_request(raw, max_instances=max_instances)
    return info.value


class TestPointers:
    """Pointers follow RFC 6901: '/'-separated tokens, ~1 is '/', ~0 is '~', '' is the root."""

    @pytest.mark.parametrize(
        ("pointer", "tokens"),
        [
            ("", ()),
            ("/", ("",)),
            ("/a/b", ("a", "b")),
            ("/a~1b", ("a/b",)),
            ("/m~0n", ("m~n",)),
            ("/~01", ("~1",)),
            ("/~10", ("/0",)),
            ("/ /0", (" ", "0")),
        ],
    )
    def test_parse(self, pointer: str, tokens: tuple[str, ...]) -> None:
        assert parse_pointer(pointer) == tokens

    @pytest.mark.parametrize("pointer", ["a/b", "/a~2", "/a~", "/~a"])
    def test_bad_pointers_raise(self, pointer: str) -> None:
        with pytest.raises(ValueError, match="pointer|'~'"):
            parse_pointer(pointer)

    # The examples of RFC 6901 section 5.
    RFC_DOC: dict[str, Any] = {
        "foo": ["bar", "baz"],
        "": 0,
        "a/b": 1,
        "c%d": 2,
        "e^f": 3,
        "g|h": 4,
        "i\\j": 5,
        'k"l': 6,
        " ": 7,
        "m~n": 8,
    }

    @pytest.mark.parametrize(
        ("pointer", "expected"),
        [
            ("/foo", ["bar", "baz"]),
            ("/foo/0", "bar"),
            ("/", 0),
            ("/a~1b", 1),
            ("/c%d", 2),
            ("/e^f", 3),
            ("/g|h", 4),
            ("/i\\j", 5),
            ('/k"l', 6),
            ("/ ", 7),
            ("/m~0n", 8),
        ],
    )
    def test_rfc_examples(self, pointer: str, expected: object) -> None:
        assert resolve(self.RFC_DOC, parse_pointer(pointer)) == expected

    def test_root(self) -> None:
        assert resolve(self.RFC_DOC, parse_pointer("")) is self.RFC_DOC

    @pytest.mark.parametrize(
        "pointer", ["/nope", "/foo/2", "/foo/-", "/foo/01", "/foo/x", "/a~1b/c"]
    )
    def test_missing_raises_key_error(self, pointer: str) -> None:
        with pytest.raises(KeyError):
            resolve(self.RFC_DOC, parse_pointer(pointer))

    def test_overlapping_outputs_are_refused(self) -> None:
        with pytest.raises(ValueError, match="overlap"):
            JsonPointerDialect(["/x"], ["/out", "/out/0"])

    def test_bad_pointer_refused_at_construction(self) -> None:
        with pytest.raises(ValueError):
            JsonPointerDialect(["x"], [])


class TestRequest:
    """The list at the first input pointer is the batch; numeric inputs are keyed by pointer."""

    DIALECT = JsonPointerDialect(["/payload/rows", "/payload/weights"], ["/result"])

    def test_count_and_inputs(self) -> None:
        doc = {"payload": {"rows": [[1, 2], [3, 4], [5, 6]], "weights": [0.5, 0.25, 1.0]}}
        parsed = self.DIALECT.parse_request(body(doc), max_instances=10)
        assert parsed.instances == 3
        np.testing.assert_array_equal(parsed.inputs["/payload/rows"], [[1, 2], [3, 4], [5, 6]])
        np.testing.assert_array_equal(parsed.inputs["/payload/weights"], [0.5, 0.25, 1.0])
        assert parsed.input_matrix() is not None
        assert parsed.input_matrix().shape == (3, 3)  # type: ignore[union-attr]
        assert parsed.doc == doc
        assert not parsed.binary

    def test_text_is_counted_not_converted(self) -> None:
        dialect = JsonPointerDialect(["/texts"], [])
        parsed = dialect.parse_request(body({"texts": ["a", "b"]}), max_instances=10)
        assert parsed.instances == 2
        assert parsed.inputs == {}

    def test_non_list_is_one_instance(self) -> None:
        dialect = JsonPointerDialect(["/x"], [])
        parsed = dialect.parse_request(body({"x": 4.5}), max_instances=10)
        assert parsed.instances == 1
        np.testing.assert_array_equal(parsed.inputs["/x"], [4.5])
        parsed = dialect.parse_request(body({"x": {"a": 1}}), max_instances=10)
        assert (parsed.instances, parsed.inputs) == (1, {})

    def test_escaped_pointer(self) -> None:
        dialect = JsonPointerDialect(["/in~1puts/a~0b"], [])
        parsed = dialect.parse_request(body({"in/puts": {"a~b": [1, 2]}}), max_instances=10)
        assert parsed.instances == 2
        assert list(parsed.inputs) == ["/in~1puts/a~0b"]

    def test_root_pointer_list(self) -> None:
        dialect = JsonPointerDialect([""], [""])
        parsed = dialect.parse_request(b"[[1], [2]]", max_instances=10)
        assert parsed.instances == 2

    def test_no_input_pointers_is_one_instance(self) -> None:
        dialect = JsonPointerDialect([], ["/y"])
        assert dialect.parse_request(b'{"a": [1, 2, 3]}', max_instances=10).instances == 1

    def test_missing_pointer_is_invalid(self) -> None:
        exc = error_of(self.DIALECT, {"payload": {"rows": [[1]]}})
        assert (exc.code, exc.status) == ("invalid_input", 400)
        assert "/payload/weights" in exc.message

    def test_batch_sizes_must_agree(self) -> None:
        exc = error_of(self.DIALECT, {"payload": {"rows": [[1], [2]], "weights": [1.0]}})
        assert exc.code == "invalid_input"

    def test_too_many_instances_is_413(self) -> None:
        doc = {"payload": {"rows": [[1]] * 5, "weights": [1] * 5}}
        exc = error_of(self.DIALECT, doc, max_instances=4)
        assert (exc.code, exc.status) == ("too_many_instances", 413)

    def test_empty_batch_is_invalid(self) -> None:
        assert error_of(self.DIALECT, {"payload": {"rows": [], "weights": []}}).code == (
            "invalid_input"
        )

    @pytest.mark.parametrize(
        ("raw", "code"),
        [(b"{bad", "body_parse_error"), (b'{"payload": {"rows": [NaN]}}', "invalid_input")],
    )
    def test_unreadable_bodies(self, raw: bytes, code: str) -> None:
        assert error_of(self.DIALECT, raw).code == code

    def test_ragged_rows_are_invalid(self) -> None:
        doc = {"payload": {"rows": [[1, 2], [3]], "weights": [1, 2]}}
        assert error_of(self.DIALECT, doc).code == "invalid_input"

    def test_never_auto_detected(self) -> None:
        assert not self.DIALECT.matches("/anything")
        assert self.DIALECT.name == "jsonpointer"


class TestResponse:
    """Numeric, rectangular values at output pointers are outputs written back where found."""

    DIALECT = JsonPointerDialect(["/x"], ["/out/scores", "/out/label", "/meta/t~1p", "/gone"])

    DOC: dict[str, Any] = {
        "out": {"scores": [[0.1, 0.9], [0.7, 0.3]], "label": [1, 0], "names": ["a", "b"]},
        "meta": {"t/p": 0.5, "other": "kept"},
        "id": "r1",
    }

    def test_outputs_and_types(self) -> None:
        parsed = self.DIALECT.parse_response(body(self.DOC))
        assert set(parsed.outputs) == {"/out/scores", "/out/label", "/meta/t~1p"}
        np.testing.assert_array_equal(parsed.outputs["/out/scores"], [[0.1, 0.9], [0.7, 0.3]])
        assert parsed.dtypes["/out/label"] == "INT64"
        # A lone number is one instance.
        np.testing.assert_array_equal(parsed.outputs["/meta/t~1p"], [0.5])

    def test_round_trip_unchanged(self) -> None:
        parsed = self.DIALECT.parse_response(body(self.DOC))
        answer = orjson.loads(self.DIALECT.serialize_response(parsed, dict(parsed.outputs)))
        assert answer == self.DOC
        assert isinstance(answer["out"]["label"][0], int)
        assert isinstance(answer["meta"]["t/p"], float)

    def test_rewritten_values_replace_only_their_pointers(self) -> None:
        parsed = self.DIALECT.parse_response(body(self.DOC))
        new = {"/out/scores": np.array([[0.0, 1.0], [1.0, 0.0]]), "/meta/t~1p": np.array([0.25])}
        answer = orjson.loads(self.DIALECT.serialize_response(parsed, new))
        assert answer["out"]["scores"] == [[0.0, 1.0], [1.0, 0.0]]
        assert answer["meta"]["t/p"] == 0.25
        assert answer["out"]["label"] == [1, 0]
        assert {k: v for k, v in answer.items() if k not in ("out", "meta")} == {"id": "r1"}
        assert answer["meta"]["other"] == "kept"
        assert parsed.doc == self.DOC  # not modified

    @pytest.mark.parametrize(
        "value",
        [[[0.1, 0.2], [0.3]], ["a", "b"], [0.1, "b"], {"k": 1}, None],
        ids=["ragged", "text", "mixed", "object", "null"],
    )
    def test_unusable_values_are_left_out(self, value: object) -> None:
        dialect = JsonPointerDialect(["/x"], ["/y"])
        parsed = dialect.parse_response(body({"y": value}))
        assert parsed.outputs == {}
        assert orjson.loads(dialect.serialize_response(parsed, {})) == {"y": value}

    def test_outputs_inside_arrays(self) -> None:
        dialect = JsonPointerDialect(["/x"], ["/data/1/v"])
        doc = {"data": [{"v": [1.5]}, {"v": [2.5, 3.5]}]}
        parsed = dialect.parse_response(body(doc))
        answer = orjson.loads(dialect.serialize_response(parsed, {"/data/1/v": np.array([0, 1.0])}))
        assert answer == {"data": [{"v": [1.5]}, {"v": [0.0, 1.0]}]}

    def test_unreadable_response_is_502(self) -> None:
        with pytest.raises(DialectError) as info:
            self.DIALECT.parse_response(b"not json")
        assert info.value.status == 502

    def test_unknown_output_refused(self) -> None:
        parsed = self.DIALECT.parse_response(body(self.DOC))
        with pytest.raises(ValueError, match="unknown output"):
            self.DIALECT.serialize_response(parsed, {"/gone": np.zeros(1)})

    @settings(max_examples=100, deadline=None)
    @given(
        values=hnp.arrays(
            np.float64,
            hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
            elements=st.floats(-1e6, 1e6, allow_nan=False),
        ),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_float_round_trip(self, values: np.ndarray, seed: int) -> None:
        dialect = JsonPointerDialect(["/x"], ["/a/b"])
        parsed = dialect.parse_response(orjson.dumps({"a": {"b": values.tolist()}, "c": 1}))
        new = np.random.default_rng(seed).standard_normal(values.shape)
        again = dialect.parse_response(dialect.serialize_response(parsed, {"/a/b": new}))
        np.testing.assert_array_equal(again.outputs["/a/b"], new)
        assert again.doc["c"] == 1  # type: ignore[index]
