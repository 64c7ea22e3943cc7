"""Worker (2 gloo processes under torchrun): the chunked LM head under FSDP2 trains as full logits do.

Each rank trains a tiny Llama sharded with ``fully_shard`` (every decoder layer and the root,
``reshard_after_forward=True``, so the root's LM head is sharded again between the forward and
the backward's recomputation of the chunks) for a few SGD steps, with ``psft_lm_head_chunk_size``'s
patch installed, and an unsharded copy of the same model on full logits. Rank 0 writes a JSON
report: the largest weight difference and how the head's weight was held.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from psft_torch.lm_head import LOGP_KEY, install_chunked_head
from psft_torch.loss import ce_loss, token_logprobs

STEPS, CHUNK, LR = 3, 5, 0.5


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 12]`` inputs and aligned targets for ``rank``, with ragged prompt masks."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(10 + rank))
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    targets[0, :3], targets[1, :6] = -100, -100
    return ids, targets


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    sharded, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    reference.load_state_dict(sharded.state_dict())
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)
    install_chunked_head(sharded, CHUNK, balance_chunks=True)
    optimizers = [torch.optim.SGD(model.parameters(), lr=LR) for model in (sharded, reference)]
    global_tokens = [sum(int((batch(r)[1] != -100).sum()) for r in range(world))] * STEPS
    for step in range(STEPS):
        ids, targets = batch(rank)
        logp = sharded(input_ids=ids, psft_lm_head_targets=targets, psft_lm_head_entropy=True)[LOGP_KEY]
        ce_loss(logp, None, targets != -100, num_tokens=global_tokens[step] / world)[0].backward()
        for r in range(world):  # the reference sees every rank's batch: data parallel's mean gradient
            ref_ids, ref_targets = batch(r)
            ref_logp = token_logprobs(reference(input_ids=ref_ids).logits, ref_targets)
            ce_loss(ref_logp, None, ref_targets != -100, num_tokens=global_tokens[step])[0].backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    head = sharded.lm_head.weight
    full = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in sharded.named_parameters()}
    diff = max((full[name] - p).abs().max().item() for name, p in reference.named_parameters())
    moved = max((p - initial[name]).abs().max().item() for name, p in reference.named_parameters())
    if rank == 0:
        report = {
            "max_weight_diff": diff,
            "reference_moved": moved,
            "head_is_dtensor": isinstance(head, DTensor),
            "head_local_numel": head.to_local().numel(),
            "head_numel": head.numel(),
        }
        with open(out_path, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
