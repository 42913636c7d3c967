"""How `soft-peft eval` picks exits: recorded, borrowed from the compared model, `default`, or an error."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from soft_peft.evaluation.pipeline import every_fourth_layer, resolve_eval_exits
from soft_peft.exits import record_exit_layers


def test_every_fourth_layer_always_ends_at_the_last():
    assert every_fourth_layer(30) == [4, 8, 12, 16, 20, 24, 28, 30]
    assert every_fourth_layer(8) == [4, 8]
    assert every_fourth_layer(3) == [3]


def test_exit_resolution_order():
    plain, soft = tiny_model("llama"), tiny_model("llama")
    record_exit_layers(soft, [1, 3, 4])
    assert resolve_eval_exits(soft, None, "soft") == [1, 3, 4]
    assert resolve_eval_exits(soft, "2,4", "soft") == [2, 4]  # explicit beats recorded
    assert resolve_eval_exits(plain, "default", "plain") == [4]
    # A model without recorded exits borrows the compared model's, dropping those beyond its depth
    assert resolve_eval_exits(plain, None, "plain", fallback=[2, 9]) == [2]
    with pytest.raises(ValueError, match="records no SoFT exits.*--exits default"):
        resolve_eval_exits(plain, None, "plain")
    with pytest.raises(ValueError, match=r"soft: exits has \[5\] outside 1..4.*e\.g\. exits=\["):
        resolve_eval_exits(soft, "2,5", "soft")
