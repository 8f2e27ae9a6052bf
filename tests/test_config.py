"""config.CallbackOptions: LOBSPruning's own options, checked without a Trainer (the other options classes are
exercised through prune_model, LOBSPruning and the solvers' tests)."""

from __future__ import annotations

import pytest
import torch

from lightning_lobs import LOBSPruning
from lightning_lobs.config import CallbackOptions


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(calibration_batches=2.0), r"calibration_batches must be an int >= 1, got 2.0 of type float"),
        (dict(calibration_batches=True), r"calibration_batches must be an int >= 1, got True of type bool"),
        (dict(state_key=3), r"state_key must be a non-empty str .*got 3"),
        (dict(log_table=1), r"log_table must be True or False, got 1"),
        (dict(progress_after=float("nan")), r"progress_after must be a number of seconds >= 0, got nan"),
        (dict(progress_after="1"), r"progress_after must be a number of seconds >= 0, got '1' of type str"),
        # the first bad field is named, in the order of LOBSPruning's checks
        (dict(calibration_batches=0, state_key="", progress_after=-1), r"calibration_batches"),
        (dict(log_table=None, reset_monitors=3), r"log_table"),
    ],
)
def test_callback_options_are_checked_without_a_trainer(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CallbackOptions(**kwargs)


def test_callback_options_store_python_numbers():
    np = pytest.importorskip("numpy")
    options = CallbackOptions(calibration_batches=np.int64(3), progress_after=np.float32(1.5))
    assert options.calibration_batches == 3 and type(options.calibration_batches) is int
    assert options.progress_after == 1.5 and type(options.progress_after) is float
    assert type(CallbackOptions(progress_after=3).progress_after) is float
    lobs = LOBSPruning(calibration_batches=torch.tensor(4), progress_after=np.float32(0.5), prune_head=True)
    assert type(lobs.calibration_batches) is int and type(lobs.progress_after) is float
