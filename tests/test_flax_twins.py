"""flax's own Dense/Conv tests, run against fg.nn.Dense / fg.nn.Conv on backend xla and on backend pallas.

``flax_linear_test_vendored.py`` is flax 0.12.8's ``tests/linen/linen_linear_test.py`` with ``nn.Dense`` /
``nn.Conv`` substituted by ours. Of its 648 tests, the 212 that build ``nn.Dense`` or ``nn.Conv`` run here
(the others test flax's DenseGeneral, Einsum, ConvLocal, ConvTranspose, Embed, which we do not touch).
Each runs inside ``use_backend(...)`` and ``record_ops()`` and must have sent at least one op through our
dispatch (so a test that silently built flax's layer instead fails).

On pallas (the Pallas interpreter on CPU: all 212 pass there too, in ~230 s on 2 cores) the two 96-case
products run on samples that keep every kernel size (``_pallas_sample``); the other 20 tests run in full.
One of them, test_dense_is_dense_general, compares our Dense with flax's DenseGeneral, which always runs on XLA:
on pallas that is our kernel against XLA's dot, equal to float32 rounding of its O(1) terms (rtol = atol = 1e-6)
rather than bit for bit, since the two sum in orders that depend on the host CPU's vector width (seen on an
AVX-512 host).
"""

import collections
import functools
import inspect
import re
from unittest import mock

import flax_linear_test_vendored as flax_tests
import numpy as np

import fastgpu_jax.nn as fnx
from fastgpu_jax.nn import backend as B

_ALL = sorted(n for n in dir(flax_tests.LinearTest) if n.startswith("test"))


def _builds_our_layers(name: str) -> bool:
    """The test calls nn.Dense(...) / nn.Conv(...) or is parametrized with one of them as ``module``."""
    fn = getattr(flax_tests.LinearTest, name)
    source = inspect.getsource(getattr(fn, "__wrapped__", fn))
    params = getattr(fn, "__x_params_repr__", "")
    return "nn.Dense(" in source or "nn.Conv(" in source or "fastgpu_jax.nn.layers." in params


SELECTED = [n for n in _ALL if _builds_our_layers(n)]


def _params(name: str) -> dict:
    """The int parameters of a generated case: ``(n_batch=1, kernel_size=3, ...)`` -> dict."""
    fn = getattr(flax_tests.LinearTest, name)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", getattr(fn, "__x_params_repr__", ""))}


def _pallas_sample(name: str) -> bool:
    """On pallas, the two 96-case products run on a sample that keeps every kernel size.

    test_circular_conv_2d_constant reaches the conv kernel (1x1: the matmul kernel); the interpreter
    compiles each shape anew (~1 s, ~5-9 s for the 81 unrolled taps of 9x9), so 3 cases per kernel size
    and one 9x9. test_circular_conv_1d_constant runs on XLA under pallas (1-D): 3 cases per kernel size."""
    p = _params(name)
    if name.startswith("test_circular_conv_2d_constant"):
        shape = (p["n_batch"], p["n_features"], p["n_input_features"], p["input_y_size"])
        if p["kernel_lin_size"] == 9:
            return shape == (1, 1, 1, 5)
        return shape in {(1, 1, 1, 5), (3, 2, 5, 10), (1, 10, 1, 10)}
    if name.startswith("test_circular_conv_1d_constant"):
        return (p["n_batch"], p["n_features"], p["n_input_features"], p["input_size"]) in {
            (1, 1, 1, 1), (3, 2, 3, 16), (1, 2, 3, 8)}
    return True


PALLAS_SELECTED = [n for n in SELECTED if _pallas_sample(n)]


class _OnBackend:
    """Runs each flax test under ``use_backend(self.backend)``; checks that it reached our dispatch and
    that every op ran on that backend or says why it ran on XLA."""

    backend = "xla"

    def setUp(self):
        super().setUp()
        self.enterContext(fnx.use_backend(self.backend))
        self.ops = self.enterContext(B.record_ops())

    def tearDown(self):
        self.assertTrue(self.ops, "the test sent no op through fastgpu_jax.nn's dispatch")
        for op, backend, info in self.ops:
            self.assertTrue(backend == self.backend or "xla_because" in info, (op, backend, info))
        super().tearDown()


def _to_rounding(test, tol: float):
    """``test`` with ``np.testing.assert_allclose``'s default tolerance (rtol 1e-7, atol 0: exact for float32)
    raised to rtol = atol = ``tol`` (a sum of O(1) terms that cancels to 0.01 keeps its absolute error only)."""
    def run(self):
        loose = functools.partial(np.testing.assert_allclose, rtol=tol, atol=tol)
        with mock.patch.object(np.testing, "assert_allclose", loose):
            test(self)
    return run


def _suite(backend: str, selected: list[str]) -> type:
    # Tests not selected are set to None: unittest (and pytest's unittest support) skip non-callables.
    hidden = {name: None for name in _ALL if name not in selected}
    across = {}  # tests that compare our layer on this backend with a flax layer on XLA
    if backend == "pallas":
        across["test_dense_is_dense_general"] = _to_rounding(flax_tests.LinearTest.test_dense_is_dense_general, 1e-6)
    return type(f"TestFlaxLinearOn{backend.title()}", (_OnBackend, flax_tests.LinearTest),
                {"backend": backend, **hidden, **across})


TestFlaxLinearOnXla = _suite("xla", SELECTED)
TestFlaxLinearOnPallas = _suite("pallas", PALLAS_SELECTED)


def test_the_selection_is_what_flax_tests_of_dense_and_conv_are():
    assert len(_ALL) == 648
    assert len(SELECTED) == 212
    sampled = collections.Counter(n.rstrip("0123456789") for n in PALLAS_SELECTED)
    assert sampled["test_circular_conv_2d_constant"] == 3 * 3 + 1
    assert sampled["test_circular_conv_1d_constant"] == 3 * 4
    assert len(PALLAS_SELECTED) == 212 - 2 * 96 + 10 + 12
    assert {_params(n)["kernel_lin_size"] for n in PALLAS_SELECTED if "2d_constant" in n} == {1, 2, 3, 9}
