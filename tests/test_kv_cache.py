"""The shared-buffer KV layout: rollback copies nothing, steps allocate nothing, overflow is refused."""

from __future__ import annotations

import numpy as np
import pytest

import ortspec
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.kv_cache import SharedBufferKVCache


def test_rollback_and_steps_keep_the_same_buffers(package):
    pipe = ortspec.load(package("llama", draft=None, exporter="builder"), max_length=64)
    decoder = DecoderState(pipe.target)
    cache = decoder.cache
    assert isinstance(cache, SharedBufferKVCache)
    pointers = [b.data_ptr() for b in cache.buffers]
    assert all(b.shape() == [1, 2, 64, 16] for b in cache.buffers)
    decoder.forward([5, 6, 7, 8, 9])
    first = decoder.forward([10])
    decoder.forward([11, 12, 13])
    decoder.truncate(5)
    assert decoder.length == 5
    again = decoder.forward([10])  # overwrite the rolled-back entries: same logits as the first time
    np.testing.assert_array_equal(again, first)
    assert [b.data_ptr() for b in cache.buffers] == pointers
    presents = decoder._binding.get_outputs()[1:]  # what ORT returned for present.*: our buffers, in place
    assert [p.data_ptr() for p in presents] == pointers


def test_calls_of_any_shape_in_turn_read_their_own_tokens(package):
    # one-token calls write their token into an input bound once and reuse the outputs of the call
    # before them; calls of another shape rebind both: every call must still read its own tokens, and
    # what an earlier call returned must survive the later ones
    pipe = ortspec.load(package("llama", draft=None, exporter="builder"), max_length=64)
    tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    reference = DecoderState(pipe.target).forward(tokens)
    decoder = DecoderState(pipe.target)
    returned, position = [], 0
    for count, last_only in ((3, True), (1, False), (1, False), (2, False), (1, False), (3, True), (1, False)):
        logits = decoder.forward(tokens[position : position + count], last_only=last_only)
        position += count
        returned.append((position, logits, logits.copy()))
    for end, logits, snapshot in returned:
        np.testing.assert_array_equal(logits, snapshot)  # not overwritten by a later call
        np.testing.assert_allclose(logits[-1], reference[end - 1], atol=1e-4)
    assert decoder._tokens[:position] == tokens[:position]


def test_max_length_bounds_generation(package):
    pipe = ortspec.load(package("llama", draft="close", exporter="builder"), max_length=32)
    assert pipe.target.max_length == pipe.draft.max_length == 32
    with pytest.raises(ortspec.ContextLengthError, match="context of 32 positions"):
        pipe.generate([5] * 30, max_new_tokens=3)
    result = pipe.generate([5] * 30, max_new_tokens=2, draft_tokens=5)  # exactly fills the buffer
    assert len(result.token_ids) == 2
    with pytest.raises(ortspec.ContextLengthError, match="holds at most 32 positions"):
        DecoderState(pipe.target).forward([5] * 33)
