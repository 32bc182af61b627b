"""Large threefry draws on CPU as straight-line code, as JAX already emits them on GPU and TPU.

JAX lowers the hash of its default PRNG on CPU as a five-step XLA while loop, which keeps
compile times short. For large draws the loop is slow: every step is a pass over memory,
plus the loop's own copies. A BERT-base training step draws ~29 M words for its dropout
masks. The straight-line form draws 3 M words in 7 ms instead of 61, and it made that step
9-14 % faster in shuffled in-process comparisons. It also compiles ~8 s slower.

Small draws keep the loop. Its output is materialised, while XLA fuses straight-line hash
code into every consumer, even one that reads each word many times: the Shapley permutation
ranking compares each key with all others, and took 175 instead of 88 us.

The hash is the same function either way, so every random bit, and with it every result,
is unchanged. `tests/test_cpu_threefry.py` checks the Random123 known answers and the bits of
`jax.random` against a process without this lowering. `install()` affects computations
compiled afterwards, in the whole process, so nothing calls it on import: `train_and_evaluate`
does when `config.cpu_threefry` is set and the backend is the CPU, the CPU benchmarks with
`--cpu_threefry`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011): the rotations of the two groups of
# four rounds, which alternate, and the key-schedule parity constant.
_ROTATIONS = np.array(((13, 15, 26, 6), (17, 29, 16, 24)), np.uint32)
_PARITY = np.uint32(0x1BD11BDA)

# Draws of at least this many word pairs are hashed by straight-line code.
STRAIGHT_LINE_MIN_SIZE = 1 << 16


def _rounds(x1, x2, distances):
  """Four Threefry rounds; `distances`: four uint32 rotation distances, static or traced."""
  for r in range(4):
    distance = distances[r]
    x1 = x1 + x2
    x2 = x1 ^ (jax.lax.shift_left(x2, distance)
               | jax.lax.shift_right_logical(x2, np.uint32(32) - distance))
  return x1, x2


def threefry2x32(key1, key2, x1, x2):
  """The hash of the counter pairs (x1, x2) under the key (key1, key2), all uint32 arrays."""
  schedule = (key1, key2, key1 ^ key2 ^ _PARITY)
  x1, x2 = x1 + schedule[0], x2 + schedule[1]
  for group in range(5):
    x1, x2 = _rounds(x1, x2, _ROTATIONS[group % 2])
    x1 = x1 + schedule[(group + 1) % 3]
    x2 = x2 + schedule[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def threefry2x32_loop(key1, key2, x1, x2):
  """`threefry2x32` as a loop over its five groups of rounds (JAX's form on CPU)."""
  key1, key2, x1, x2 = jnp.broadcast_arrays(key1, key2, x1, x2)
  schedule = jnp.stack([key1, key2, key1 ^ key2 ^ _PARITY])
  rotations = jnp.asarray(_ROTATIONS)

  def group(index, x):
    x1, x2 = _rounds(*x, rotations[index % 2])
    return (x1 + schedule[(index + 1) % 3],
            x2 + schedule[(index + 2) % 3] + (index + 1).astype(jnp.uint32))

  return jax.lax.fori_loop(0, 5, group, (x1 + schedule[0], x2 + schedule[1]))


@functools.cache  # steps and shapley both call it; one registration is enough
def install() -> bool:
  """Lowers JAX's threefry2x32 primitive on CPU: straight-line code from
  STRAIGHT_LINE_MIN_SIZE words on, the loop below. False where this JAX does not expose the
  primitive or the lowering registry (nothing changes then)."""
  try:
    from jax.extend.random import threefry2x32_p
    from jax.interpreters.mlir import lower_fun, register_lowering
  except ImportError:  # also raised for a name the module lacks
    return False
  straight = lower_fun(threefry2x32, multiple_results=True)
  loop = lower_fun(threefry2x32_loop, multiple_results=True)

  def lowering(ctx, *args):
    size = math.prod(ctx.avals_out[0].shape)
    return (straight if size >= STRAIGHT_LINE_MIN_SIZE else loop)(ctx, *args)

  register_lowering(threefry2x32_p, lowering, platform="cpu")
  return True
