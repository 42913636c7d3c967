"""`soft_peft.exit_forward`: the resolved loss of a model is checked when built, labelled positions are picked as
transformers shifts labels, and the logged sums travel across ranks by name."""

import pytest
import torch

from soft_peft import SoFTSettings
from soft_peft.exit_forward import ExitStats, LabelledPositions, ResolvedExitLoss


def test_a_weight_count_that_is_not_one_per_exit_is_refused():
    with pytest.raises(ValueError, match=r"1 exit weights for 2 exits \(2, 4\)"):
        ResolvedExitLoss(SoFTSettings(), exit_layers=(2, 4), exit_loss_weights=(1.0,))


def test_a_schedule_that_would_train_nothing_is_refused_at_once():
    # Only the shallowest exit has weight, and a deepest-first ramp starts it last: step 0 would train nothing
    with pytest.raises(ValueError, match="every exit at weight 0"):
        ResolvedExitLoss(SoFTSettings(exit_ramp_steps=6), exit_layers=(1, 2, 4), exit_loss_weights=(1.0, 0.0, 0.0))


def test_schedule_and_layer_dropout_follow_the_settings_and_the_seed():
    settings = SoFTSettings(exit_rotation=1, layer_dropout=0.2, layer_dropout_scale="linear")
    resolved = ResolvedExitLoss(settings, exit_layers=(1, 2, 4), exit_loss_weights=(0.25, 0.25, 0.5), seed=7)
    assert (resolved.schedule.rotation, resolved.schedule.is_constant) == (1, False)
    dropout = resolved.layer_dropout
    assert (dropout.rate, dropout.scale, dropout.seed) == (0.2, "linear", 7)


@pytest.mark.parametrize("pre_shifted", [False, True])
def test_labelled_positions_pick_the_states_that_predict_each_label(pre_shifted):
    labels = torch.tensor([[-100, 5, 6, -100], [7, 8, -100, 9]])  # (B=2, T=4)
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # (B, T, H=3)
    if pre_shifted:  # context parallelism: label i is already the target of position i
        shifted = torch.tensor([[5, 6, -100, -100], [8, -100, 9, -100]])
        positions = LabelledPositions.of(labels, shifted, torch.device("cpu"))
    else:  # transformers' convention: position i predicts label i + 1
        positions = LabelledPositions.of(labels, None, torch.device("cpu"))
    expected_rows = [(0, 0), (0, 1), (1, 0), (1, 2)]  # (row, position) of each labelled position
    assert positions.targets.tolist() == [5, 6, 8, 9]
    torch.testing.assert_close(positions.select(states), torch.stack([states[b, t] for b, t in expected_rows]))


def test_stats_are_summed_over_ranks_field_by_field():
    local = ExitStats(
        computed_exits=[2, 4],
        exit_nll_sums=[torch.tensor(1.5), torch.tensor(2.0)],
        exit_num_correct=[torch.tensor(3), torch.tensor(4)],
        num_tokens=torch.tensor(10),
        last_layer_num_correct=torch.tensor(5),
        last_layer_entropy_sum=None,  # not requested: left out of the collective
        exit_kl_sums=[torch.tensor(0.5)],
        exit_num_agree=[torch.tensor(6)],
    )

    def gather(tensor):  # `accelerator.gather` on 2 processes, the other rank holding twice these sums
        return torch.cat([tensor, 2 * tensor])

    totals = local.summed(gather)
    assert totals.computed_exits == [2, 4]
    assert (totals.exit_nll_sums, totals.exit_num_correct) == ([4.5, 6.0], [9.0, 12.0])
    assert (totals.num_tokens, totals.last_layer_num_correct, totals.last_layer_entropy_sum) == (30.0, 15.0, None)
    assert (totals.exit_kl_sums, totals.exit_num_agree) == ([1.5], [18.0])
    assert local.summed(lambda t: t).exit_num_correct == [3.0, 4.0]  # one process
