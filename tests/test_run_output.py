"""What a run shows its user besides results: no library warnings that are not the user's
to act on (peft's call of a deprecated transformers property)."""

from __future__ import annotations

import warnings

from fedlora.models.export import quiet_peft


def test_quiet_peft_silences_that_warning_only():
    """The filter is targeted: other FutureWarnings still reach the user. (A whole run's
    stderr is checked in tests/test_cli_paths.py.)"""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_peft():
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                FutureWarning,
            )
            warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
