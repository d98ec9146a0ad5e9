"""Probe (issue 21): FSDP2 fully_shard on CPU over gloo, 2 processes, a tiny random Llama trained in full,
against 1 process with the same global batch. Not layerfold code: it shows what this torch supports.

    python benchmarks/fsdp_probe.py single && torchrun --nproc_per_node 2 benchmarks/fsdp_probe.py
"""
import os, sys, torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM
def build():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=64))
    return m
def main():
    torch.manual_seed(1); ids = torch.randint(0, 256, (4, 16))
    if len(sys.argv) > 1 and sys.argv[1] == "single":
        m = build(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(2):
            loss = m(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()
        torch.save({k: v.detach() for k, v in m.state_dict().items()}, os.environ.get("PROBE_OUT", "/tmp/fsdp_single.pt")); print("single", loss.item()); return
    dist.init_process_group("gloo"); r = dist.get_rank()
    from torch.distributed.fsdp import fully_shard
    m = build()
    for layer in m.model.layers: fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    part = ids[r * 2:(r + 1) * 2]
    for _ in range(2):
        loss = m(part, labels=part).loss; loss.backward(); opt.step(); opt.zero_grad()
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in m.state_dict().items()}
    if r == 0:
        ref = torch.load(os.environ.get("PROBE_OUT", "/tmp/fsdp_single.pt"))
        print("fsdp2 max |diff| vs single:", max((full[k] - ref[k]).abs().max().item() for k in ref), "loss", loss.item())
    dist.destroy_process_group()
main()
