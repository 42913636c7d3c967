"""Run by test_fsdp2.py under `torchrun --nproc_per_node 2`: the SoFT loss of a model sharded with PyTorch FSDP2
(`fully_shard`, gloo, CPU), each rank on its own half of a batch, against one unsharded process on each half.

accelerate 1.15 cannot launch FSDP on CPU (it enables FSDP only for GPU-type backends), so this drives FSDP2 the way
accelerate's `fsdp2.yaml` does (`fully_shard` per decoder layer, then the root) without it. Prints "OK" on success.
"""

import torch
import torch.distributed as dist
from tiny_models import tiny_model  # on PYTHONPATH: test_fsdp2.py puts tests/ there
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from soft_peft import SoFTSettings, add_sorted_exit_loss

EXITS = [2, 4]


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    batch = torch.randint(3, 101, (4, 24))  # (B, T): rank r takes rows 2r, 2r+1
    labels = batch.clone()
    labels[:, :5] = -100  # a prompt without loss, as in prompt-completion data

    # Reference: one unsharded process, the mean of the per-half gradients (what data parallelism averages)
    reference = tiny_model("llama")
    add_sorted_exit_loss(reference, SoFTSettings(exit_layers=EXITS))
    reference_losses = []
    for half in (slice(0, 2), slice(2, 4)):
        output = reference(input_ids=batch[half], labels=labels[half], soft_exit_loss=True)
        (output.loss / 2).backward()
        reference_losses.append({k: v.item() for k, v in output.exit_losses.items()})

    model = tiny_model("llama")
    add_sorted_exit_loss(model, SoFTSettings(exit_layers=EXITS))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    assert model.lm_head.weight.to_local().shape[0] < model.lm_head.weight.shape[0]  # really sharded

    mine = slice(2 * rank, 2 * rank + 2)
    output = model(input_ids=batch[mine], labels=labels[mine], soft_exit_loss=True)
    output.loss.backward()
    for layer, loss in output.exit_losses.items():
        torch.testing.assert_close(loss.item(), reference_losses[rank][layer], rtol=1e-5, atol=0)
    for name, param in model.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(param.grad.full_tensor(), expected, rtol=1e-4, atol=1e-6, msg=name)
    # The full state dict (gathered on rank 0, as FULL_STATE_DICT saving does) is the vanilla model's
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        expected = reference.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
        print("OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
