"""Training-data rules that decide what the model learns from (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr.artifacts.acoustic import default_contract
from streamasr.core.features import whole_file_windows
from training import asterisk
from training.train_ctc import full_sequence


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Please press 1 to mute or unmute yourself.",
            "please press one to mute or unmute yourself",
        ),
        ("Agent Logged off.", "agent logged off"),
        ("Call-Forward on Busy.", "call forward on busy"),
        ("You have 12 new messages", "you have twelve new messages"),
        ("[this is a simple beep tone]", None),  # a note, not speech
        ("press * to toggle pause", None),  # keypad symbols: how were they read?
        ("followed by # or just # to exit", None),
        ("a 28.8 kilobit modem", None),  # decimals
        ("dial 500 to attempt", None),  # "five hundred" or "five oh oh"?
        ("3D audio enabled", None),
        ("", None),
    ],
)
def test_asterisk_prompts_kept_only_when_their_reading_is_clear(text, expected):
    assert asterisk.usable_text(text) == expected


def test_asterisk_split_is_stable_and_proportional():
    names = [f"prompt-{i}" for i in range(5000)]
    splits = [asterisk.split_of(n) for n in names]
    assert splits == [asterisk.split_of(n) for n in names]
    for split, share in asterisk.SPLITS:
        assert abs(splits.count(split) / len(names) - share) < 0.03


def test_full_sequence_is_what_the_windows_were_cut_from():
    """The full-context ablation encodes the sequence the serving windows come from:
    cutting it again gives back exactly those windows."""
    c = default_contract()
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(3.3 * c.sample_rate))).astype(np.float32)
    w = whole_file_windows(c, audio).features
    seq = full_sequence(c, w)
    assert len(seq) == c.chunk_frames * len(w) + c.left_frames + c.right_frames
    recut = np.stack(
        [seq[i * c.chunk_frames : i * c.chunk_frames + c.window_frames] for i in range(len(w))]
    )
    np.testing.assert_array_equal(recut, w)
