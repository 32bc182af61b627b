"""experiments/bench_matmul.py times the products a dense layer's training makes.

Both contenders must compute the product named in each row (checked against float64 numpy on
the operands as stored, the product written here from its name), and the rows must be the 9
distinct shapes of one BERT layer's 18.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import bench_matmul  # noqa: E402  (experiments/ is not a package)


def test_products_are_one_layers_forward_and_both_gradients():
  rows = bench_matmul.products(tokens=10, hidden=4, intermediate=16)
  shapes = {(p.name, p.m, p.k, p.n) for p in rows}
  assert shapes == {("HxH x@W", 10, 4, 4), ("HxH dy@W.T", 10, 4, 4), ("HxH x.T@dy", 4, 10, 4),
                    ("HxI x@W", 10, 4, 16), ("HxI dy@W.T", 10, 16, 4), ("HxI x.T@dy", 4, 10, 16),
                    ("IxH x@W", 10, 16, 4), ("IxH dy@W.T", 10, 4, 16), ("IxH x.T@dy", 16, 10, 4)}
  assert sum(p.per_layer for p in rows) == 18


def test_every_contender_computes_its_product():
  rng = np.random.default_rng(0)
  for p in bench_matmul.products(tokens=10, hidden=4, intermediate=16):
    a, b = p.operands(rng)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected = {"x@W": lambda: a64 @ b64, "dy@W.T": lambda: a64 @ b64.T,
                "x.T@dy": lambda: a64.T @ b64}[p.name.split()[1]]()
    runners = bench_matmul.contenders(p, a, b)
    for fn, _ in runners.values():
      got = np.asarray(fn(), np.float64)
      assert got.shape == (p.m, p.n), p.name
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=p.name)
    assert bench_matmul.max_error(p, a, b, runners) < 1e-5, p.name


def test_run_prints_a_row_per_product_and_the_layer_sum():
  rows = bench_matmul.run(tokens=10, hidden=4, intermediate=16, iters=1, rounds=1)
  assert len(rows) == 9 and all(r["jax_s"] > 0 and r["pytorch_s"] > 0 for r in rows)
  text = bench_matmul.table(rows)
  assert "one layer's 18 products" in text and len(text.splitlines()) == 2 + 9 + 2
