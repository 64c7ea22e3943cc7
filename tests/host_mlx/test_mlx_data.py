"""The loss mask covers exactly the response tokens: mlx-lm's default one counts a padding slot."""

import mlx.core as mx
import numpy as np

from psft_mlx.data import first_trainable, iterate_micro_batches, response_mask, to_micro_batch, trainable_tokens

# (tokens, offset) as mlx-lm's datasets produce them: offset = first response position (0 = all).
EXAMPLES = [([5, 6, 7, 8, 9], 3), ([5, 6, 7], 0), ([5, 6, 7, 8, 9, 10, 11], 2), ([5, 6, 7, 8], 1)]


def _mlx_lm_default_mask(lengths, width):
    """The mask of mlx_lm.tuner.trainer.default_loss (0.32.2), copied to show the off-by-one."""
    steps = mx.arange(1, width + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


def _padded_batch(examples, width):
    tokens = np.zeros((len(examples), width), np.int32)
    for row, (ids, _) in enumerate(examples):
        tokens[row, : len(ids)] = ids
    lengths = mx.array([[offset, len(ids)] for ids, offset in examples])
    return mx.array(tokens), lengths


def test_mask_is_exactly_the_response_targets():
    tokens, lengths = _padded_batch(EXAMPLES, 9)
    mb = to_micro_batch(tokens, lengths)
    mask = np.array(mb.mask)
    targets = np.array(mb.targets)
    for row, (ids, offset) in enumerate(EXAMPLES):
        # target t is token t+1: response targets are positions max(offset, 1) .. len-1
        expected = [ids[p] for p in range(max(offset, 1), len(ids))]
        assert targets[row][mask[row] > 0].tolist() == expected
    assert mb.tokens == sum(trainable_tokens(e, 9) for e in EXAMPLES) == 2 + 2 + 5 + 3
    assert mb.rows == 4 and mb.inputs.shape == mb.targets.shape == (4, 8)


def test_mlx_lm_default_mask_counts_one_padding_token_per_sequence():
    tokens, lengths = _padded_batch(EXAMPLES, 9)
    ours = np.array(response_mask(lengths, 8)).sum()
    theirs = np.array(_mlx_lm_default_mask(lengths, 8)).sum()
    assert theirs == ours + len(EXAMPLES)


def test_batches_from_mlx_lm_iterate_batches_are_masked_and_truncated():
    dataset = EXAMPLES * 2
    batches = list(iterate_micro_batches(dataset, batch_size=2, max_seq_length=6, loop=False, seed=0))
    assert len(batches) == 4
    assert sum(mb.tokens for mb in batches) == 2 * sum(trainable_tokens(e, 6) for e in EXAMPLES)
    for mb in batches:
        assert mb.inputs.shape[1] <= 5 and float(mb.mask.sum()) == mb.tokens


def test_first_trainable_finds_none_when_truncation_removes_every_response():
    assert first_trainable(EXAMPLES, 2048) == 0
    assert first_trainable([([1, 2, 3, 4], 4), ([1, 2], 1)], 2048) == 1
    assert first_trainable([([1, 2, 3, 4, 5], 3), ([1, 2, 3, 4], 3)], 3) is None
