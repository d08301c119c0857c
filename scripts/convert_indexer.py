#!/usr/bin/env python3
"""Convert a released FlashMemory memory-indexer checkpoint (top3_R930_joint.pt, a torch.save of
JointLayerRetriever's state_dict, or a per-epoch {"model_state": ...} dict) into the safetensors
file flashmem loads (docs/lsa.md, "Indexer checkpoints").

Key mapping (names are kept verbatim; flashmem reads the official names):
  retrievers.l{csa}.wq_a.weight          [R, hidden]   query down-projection
  retrievers.l{csa}.q_norm_weight        [R]           RMSNorm gain (no ".weight" suffix)
  retrievers.l{csa}.wq_b.weight          [H*128, R]    query up-projection
  retrievers.l{csa}.weights_proj.weight  [H, hidden]   per-head weights
  retrievers.l{csa}.freqs_cis            dropped (every inference loader rebuilds the table)
{csa} is the index among the model's CSA layers (l10 = model layer 22 in DeepSeek-V4).

Needs torch and safetensors (pip install torch safetensors); flashmem itself does not.
Usage: convert_indexer.py top3_R930_joint.pt OUT_DIR
"""
import os
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import save_file

    src, out_dir = sys.argv[1], sys.argv[2]
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    kept = {}
    for name, tensor in state.items():
        if not name.startswith("retrievers.l"):
            print(f"skipping {name}: not a retriever tensor", file=sys.stderr)
            continue
        if name.endswith("freqs_cis"):
            continue
        kept[name] = tensor.detach().to(torch.float32).contiguous()
    layers = sorted({int(n[len("retrievers.l"):].split(".", 1)[0]) for n in kept})
    if not layers:
        print(f"{src}: no retrievers.l<csa>.* tensors", file=sys.stderr)
        return 1
    first = layers[0]
    heads = kept[f"retrievers.l{first}.wq_b.weight"].shape[0] // 128
    rank = kept[f"retrievers.l{first}.wq_a.weight"].shape[0]
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, "fm_indexer.safetensors")
    save_file(kept, dst, metadata={"n_heads": str(heads), "head_dim": "128", "q_lora_rank": str(rank),
                                   "layers": ",".join(map(str, layers))})
    print(f"wrote {dst}: layers {layers}, {heads} heads, q_lora_rank {rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
