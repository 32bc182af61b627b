"""Tests for shapca_jax.cpu_threefry: the same hash, so the same random bits, either form; and
nothing of shapca_jax installs it on import."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from shapca_jax import cpu_threefry

# Random123's known answers for Threefry-2x32 with 20 rounds: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
]
LARGE = cpu_threefry.STRAIGHT_LINE_MIN_SIZE

# Draws through jax.random as training makes them (dropout masks large and small, key
# splits, a permutation), reduced to one digest.
DRAWS = """
import hashlib, jax, jax.numpy as jnp, numpy as np
key = jax.random.key(42)
draws = [jax.random.bits(key, (5000,), jnp.uint32),
         jax.random.bits(jax.random.fold_in(key, 1), (3, %d), jnp.uint32),
         jax.random.bernoulli(jax.random.fold_in(key, 7), 0.9, (33, 77)),
         jax.random.key_data(jax.random.split(key, 5)),
         jax.random.permutation(jax.random.key(3), 100)]
print(hashlib.sha256(b"".join(np.asarray(d).tobytes() for d in draws)).hexdigest())
""" % LARGE

# Lowers one large draw before and after importing every module of shapca_jax, then after
# install(): the import must leave the lowering as JAX made it, install() must change it.
LOWERINGS = """
import importlib, json, pkgutil, jax, jax.numpy as jnp
lowered = lambda: jax.jit(lambda key: jax.random.bits(key, (%d,), jnp.uint32)).lower(
    jax.random.key(0)).as_text()
before = lowered()
import shapca_jax
modules = sorted(m.name for m in pkgutil.walk_packages(shapca_jax.__path__, "shapca_jax."))
for name in modules:
  importlib.import_module(name)
after_imports = lowered()
from shapca_jax import cpu_threefry
cpu_threefry.install()
print(json.dumps({"modules": modules, "before": before, "after_imports": after_imports,
                  "installed": lowered()}))
""" % LARGE


@pytest.fixture(scope="module", autouse=True)
def installed():
  assert cpu_threefry.install()


@pytest.mark.parametrize("form", [cpu_threefry.threefry2x32, cpu_threefry.threefry2x32_loop])
@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_both_forms_give_the_known_answers(form, key, counter, expected):
  u32 = lambda pair: tuple(jnp.uint32(v) for v in pair)
  np.testing.assert_array_equal(form(*u32(key), *u32(counter)), expected)


@pytest.mark.parametrize("size", [1, LARGE])
@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_jax_primitive_gives_the_known_answers_on_cpu(size, key, counter, expected):
  counters = jnp.tile(jnp.array(counter, jnp.uint32)[:, None], (1, size))
  out = jax.jit(threefry_2x32)(jnp.array(key, jnp.uint32), counters)
  np.testing.assert_array_equal(np.asarray(out), np.tile(np.array(expected)[:, None], (1, size)))


def test_random_bits_equal_those_of_a_process_without_it():
  def digest(prefix):
    return subprocess.run([sys.executable, "-c", prefix + DRAWS], capture_output=True,
                          text=True, check=True).stdout.strip()

  reference = digest("")
  installing = "from shapca_jax import cpu_threefry\ncpu_threefry.install()\n"
  assert len(reference) == 64 and digest(installing) == reference


def test_importing_shapca_jax_leaves_the_lowering_alone():
  out = json.loads(subprocess.run([sys.executable, "-c", LOWERINGS], capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[-1])
  assert {"shapca_jax.steps", "shapca_jax.shapley", "shapca_jax.train"} <= set(out["modules"])
  assert out["after_imports"] == out["before"]
  assert out["installed"] != out["before"]  # The comparison sees an installed lowering.


@pytest.mark.parametrize("size, loops", [(LARGE // 2, True), (LARGE, False)])
def test_only_small_draws_compile_to_a_loop(size, loops):
  draw = jax.jit(lambda key: jax.random.bits(key, (size,), jnp.uint32))
  hlo = draw.lower(jax.random.key(0)).compile().as_text()
  assert (" while(" in hlo) == loops
