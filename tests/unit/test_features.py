"""Detector features: the fixed projection, numeric input rows, text signatures, top-1 and margin."""

from __future__ import annotations

import numpy as np
import pytest

from extauthz.detect.features import (
    Projector,
    minhash,
    ngram_vector,
    numeric_matrix,
    top1_margin,
)


class TestProjector:
    """The projection is a fixed function of (seed, width), bounded to ``dim``, distance-keeping."""

    def test_same_seed_and_width_give_the_same_projection(self) -> None:
        """Two projectors (two replicas) reduce the same rows to the same vectors."""
        rows = np.random.default_rng(1).normal(size=(5, 300))
        assert np.array_equal(Projector(32, seed=7).project(rows), Projector(32, 7).project(rows))

    def test_seed_and_width_change_the_matrix(self) -> None:
        """Another seed or another input width draws another matrix."""
        projector = Projector(32, seed=0)
        assert not np.array_equal(projector.matrix(300), Projector(32, seed=1).matrix(300))
        assert not np.array_equal(projector.matrix(300)[:200], projector.matrix(200))

    @pytest.mark.parametrize("width", [33, 100, 4096])
    def test_output_is_n_by_dim_float32(self, width: int) -> None:
        """Any width comes out as (n, dim) float32."""
        out = Projector(16).project(np.ones((3, width)))
        assert out.shape == (3, 16)
        assert out.dtype == np.float32

    def test_narrow_inputs_pass_through_padded(self) -> None:
        """Inputs no wider than dim are kept exactly, padded with zeros."""
        rows = np.arange(12, dtype=np.float64).reshape(2, 6)
        out = Projector(8).project(rows)
        assert np.array_equal(out[:, :6], rows.astype(np.float32))
        assert not out[:, 6:].any()

    def test_pairwise_distances_are_roughly_kept(self) -> None:
        """Johnson-Lindenstrauss: projected distances over true ones stay near 1."""
        rows = np.random.default_rng(2).normal(size=(40, 784))
        out = Projector(32, seed=3).project(rows).astype(np.float64)
        i, j = np.triu_indices(40, k=1)
        ratio = np.linalg.norm(out[i] - out[j], axis=1) / np.linalg.norm(rows[i] - rows[j], axis=1)
        assert 0.85 < float(np.median(ratio)) < 1.15
        assert 0.4 < float(ratio.min()) and float(ratio.max()) < 1.7

    def test_cache_is_bounded(self) -> None:
        """Many input widths keep at most 16 matrices, and evicted ones come back the same."""
        projector = Projector(4)
        first = projector.matrix(10).copy()
        for width in range(11, 40):
            projector.matrix(width)
        assert len(projector._matrices) == 16
        assert np.array_equal(projector.matrix(10), first)

    def test_rejects_non_matrix_input(self) -> None:
        """A 1-D input is an error, not a silent reshape."""
        with pytest.raises(ValueError, match="matrix"):
            Projector(4).project(np.ones(10))


class TestNumericMatrix:
    """One row per instance: numeric inputs flattened in name order, non-finite values zeroed."""

    def test_inputs_are_flattened_and_concatenated_in_name_order(self) -> None:
        """Names sorted: 'a' (2x2 per instance) comes before 'b' (1 per instance)."""
        inputs = {"b": np.array([10.0, 20.0]), "a": np.arange(8.0).reshape(2, 2, 2)}
        out = numeric_matrix(inputs, 2)
        assert out is not None and out.dtype == np.float32
        assert out.tolist() == [[0, 1, 2, 3, 10], [4, 5, 6, 7, 20]]

    def test_text_inputs_are_left_out(self) -> None:
        """String arrays do not take part; only the numeric one remains."""
        inputs = {"text": np.array(["x", "y"]), "x": np.array([[1.0], [2.0]])}
        out = numeric_matrix(inputs, 2)
        assert out is not None and out.tolist() == [[1.0], [2.0]]

    def test_non_finite_values_become_zero(self) -> None:
        """NaN and infinities would poison distances: they become 0."""
        out = numeric_matrix({"x": np.array([[np.nan, np.inf, -np.inf, 2.0]])}, 1)
        assert out is not None and out.tolist() == [[0.0, 0.0, 0.0, 2.0]]

    def test_nothing_numeric_gives_none(self) -> None:
        """No inputs, or only text: None."""
        assert numeric_matrix({}, 1) is None
        assert numeric_matrix({"t": np.array(["a"])}, 1) is None

    def test_disagreeing_shapes_give_none(self) -> None:
        """An input whose first axis is not the instance count gives None."""
        assert numeric_matrix({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, 2) is None
        assert numeric_matrix({"a": np.array(1.0)}, 1) is None


class TestTextSignatures:
    """Hashed n-gram vectors and MinHash signatures are stable and reflect text similarity."""

    def test_minhash_is_pinned(self) -> None:
        """The signature is the same in every process (blake2b keys, not Python's hash)."""
        assert minhash("hello world")[:3].tolist() == [
            1459028907772402328,
            965818679091157773,
            2912647512721180868,
        ]

    def test_ngram_vector_is_pinned_and_unit_length(self) -> None:
        """Buckets and signs are the same in every process; the vector has norm 1."""
        vector = ngram_vector("hello world")
        assert vector.shape == (256,) and vector.dtype == np.float32
        assert np.flatnonzero(vector)[:5].tolist() == [21, 28, 85, 118, 143]
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-6)

    def test_similar_texts_are_closer_than_different_ones(self) -> None:
        """A one-word edit keeps the cosine high; an unrelated text does not."""
        base = ngram_vector("please classify this movie review as positive or negative")
        edit = ngram_vector("please classify this film review as positive or negative")
        other = ngram_vector("the mitochondria is the powerhouse of the cell")
        assert float(base @ edit) > 0.7 > 0.3 > float(base @ other)

    def test_minhash_estimates_jaccard(self) -> None:
        """Equal positions of two 256-hash signatures estimate the gram sets' Jaccard."""
        a, b = "the quick brown fox jumps over the lazy dog", "the quick brown fox leaps over a dog"

        def grams(text: str) -> set[str]:
            return {text[i : i + 3] for i in range(len(text) - 2)}

        true = len(grams(a) & grams(b)) / len(grams(a) | grams(b))
        estimate = float(np.mean(minhash(a, m=256) == minhash(b, m=256)))
        assert estimate == pytest.approx(true, abs=0.1)

    def test_seed_changes_the_signature(self) -> None:
        """Another seed gives another signature of the same text."""
        assert not np.array_equal(minhash("abc def", seed=0), minhash("abc def", seed=1))

    def test_short_and_empty_texts(self) -> None:
        """A text shorter than n is one gram; an empty text gives the zero vector."""
        assert minhash("ab").shape == (64,)
        assert not np.array_equal(minhash("ab"), minhash("ba"))
        assert not ngram_vector("").any()
        assert np.array_equal(minhash(""), minhash(""))


class TestTop1Margin:
    """The predicted class and the top-1 minus top-2 probability of each answer."""

    def test_multiclass_rows(self) -> None:
        """Each row's argmax and the gap to its runner-up; a tie has margin 0."""
        top1, margin = top1_margin([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.45, 0.45, 0.1]])
        assert top1.dtype == np.int64 and margin.dtype == np.float32
        assert top1.tolist()[:2] == [1, 0]
        assert margin.tolist() == pytest.approx([0.5, 0.1, 0.0], abs=1e-6)

    def test_binary_single_column_is_p_against_one_minus_p(self) -> None:
        """K == 1: class 1 when p >= 0.5, margin |2p - 1|; a 1-D array reads the same."""
        for probs in ([[0.9], [0.2], [0.5]], [0.9, 0.2, 0.5]):
            top1, margin = top1_margin(probs)
            assert top1.tolist() == [1, 0, 1]
            assert margin.tolist() == pytest.approx([0.8, 0.6, 0.0], abs=1e-6)

    def test_rejects_empty_classes(self) -> None:
        """No classes at all is an error."""
        with pytest.raises(ValueError, match="probabilities"):
            top1_margin(np.zeros((2, 0)))
