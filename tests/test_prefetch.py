"""The device prefetcher: the plain iterator's batches, in its order, and a resume state that
counts the batches handed out, not those read ahead."""

import jax
import numpy as np
import pytest

from shapca_jax.data.pipeline import BatchPipeline
from shapca_jax.data.tokenization import Encoder
from shapca_jax.prefetch import DevicePrefetcher


@pytest.fixture(scope="module")
def make_pipeline(minilm_dir, twitter_valid):
  encoder = Encoder(minilm_dir, "mner")
  return lambda: BatchPipeline(twitter_valid, encoder, batch_size=16, shuffle=True, seed=5,
                               num_epochs=2, drop_remainder=True)


def _assert_same(device_batch, host_batch):
  assert sorted(device_batch) == sorted(host_batch)
  for name, value in host_batch.items():
    assert isinstance(device_batch[name], jax.Array)
    np.testing.assert_array_equal(np.asarray(device_batch[name]), value, err_msg=name)


@pytest.mark.parametrize("depth", [0, 3])  # 0: no thread, each batch put when asked for
def test_prefetched_batches_are_the_plain_iterators_in_order(make_pipeline, depth):
  plain = list(iter(make_pipeline()))
  with DevicePrefetcher(iter(make_pipeline()), jax.device_put, depth=depth) as prefetched:
    got = list(prefetched)
    with pytest.raises(StopIteration):  # exhausted stays exhausted
      next(prefetched)
  assert len(got) == len(plain) == 2 * make_pipeline().report.batches_per_epoch
  for device_batch, host_batch in zip(got, plain):
    _assert_same(device_batch, host_batch)


@pytest.mark.parametrize("consumed", [0, 1, 7, 70])  # 70: in the second epoch
def test_state_resumes_after_the_batches_handed_out(make_pipeline, consumed):
  plain = list(iter(make_pipeline()))
  with DevicePrefetcher(iter(make_pipeline()), jax.device_put, depth=4) as prefetched:
    for _ in range(consumed):
      next(prefetched)
    while prefetched._queue.qsize() < 4:  # the thread has read ahead of what was handed out
      pass
    state = prefetched.get_state()
  resumed = iter(make_pipeline())
  resumed.set_state(state)
  for expected in plain[consumed:consumed + 3]:
    got = next(resumed)
    np.testing.assert_array_equal(got["example_index"], expected["example_index"])
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("depth", [0, 2])
def test_an_error_of_the_source_reaches_the_consumer(depth):
  class Source:
    def __init__(self):
      self.count = 0

    def __next__(self):
      self.count += 1
      if self.count == 3:
        raise OSError("disk gone")
      return {"x": np.full(2, self.count)}

    def get_state(self):
      return self.count

  with DevicePrefetcher(Source(), jax.device_put, depth=depth) as prefetched:
    assert [int(next(prefetched)["x"][0]) for _ in range(2)] == [1, 2]
    assert prefetched.get_state() == 2
    for _ in range(2):
      with pytest.raises(OSError, match="disk gone"):
        next(prefetched)
