#!/usr/bin/env python3
"""The PyTorch equivalents of tests/bench/cuda/kernel_bench on the same machine and shapes.

GEMMs: torch._scaled_mm (FP8 e4m3, per-tensor scales; M padded to 16 as it requires) and bf16
matmul. Sparse MQA: gather of bf16 KV rows + scaled_dot_product_attention (h_q 64, 16, 8; h_kv 1).
Indexer scores: bf16 einsum + relu + weighted sum. CUDA-event medians after a warm-up; inputs random
and weights rotated across copies larger than L2. Prints a markdown table.
    python3 tests/bench/cuda/torch_kernels.py [--quick]
"""
import sys

import torch
import torch.nn.functional as F

quick = "--quick" in sys.argv
dev = "cuda"
rows = []


def time_us(fn, reps=50, warm=5):
    for i in range(warm):
        fn(i)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0)
    ts.sort()
    return ts[len(ts) // 2]


def gemm_rows(n_out, k, name):
    copies = max(2, (256 << 20) // (n_out * k))
    ws = [torch.randn(n_out, k, device=dev).to(torch.float8_e4m3fn) for _ in range(copies)]
    one = torch.ones((), device=dev)
    for m in ([1, 64] if quick else [1, 8, 32, 64, 4096]):
        mp = max(16, m)
        x = torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn)
        us = time_us(lambda i: torch._scaled_mm(x, ws[i % copies].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                     reps=10 if m >= 4096 else 50)
        byt = n_out * k + mp * k + mp * n_out * 2
        rows.append((f"torch._scaled_mm FP8 ({name})", f"{m}x{k} -> {n_out}", us, byt / us / 1e3, 2 * m * n_out * k / us / 1e6))
        wb = ws[0].to(torch.bfloat16)
        xb = torch.randn(mp, k, device=dev, dtype=torch.bfloat16)
        us = time_us(lambda i: xb @ wb.t(), reps=10 if m >= 4096 else 50)
        rows.append((f"torch bf16 matmul ({name})", f"{m}x{k} -> {n_out}", us, (2 * n_out * k) / us / 1e3, 2 * m * n_out * k / us / 1e6))


gemm_rows(4096, 4096, "wq_b-like")
gemm_rows(2048, 4096, "expert w1 shape")

# Sparse MQA: gather + SDPA over bf16 rows (what a framework does without a paged FP8 kernel); 64
# heads, and 16 and 8 (a tensor-parallel shard's); 8,192 slots (an HCA layer at a 1M context) at 16.
entries = 4096 * 64
kv = torch.randn(entries, 512, device=dev, dtype=torch.bfloat16)
batches = [1, 64] if quick else [1, 8, 32, 64, 128]
shapes = [(640, 64, batches), (640, 16, batches), (640, 8, batches), (8192, 16, [1] if quick else [1, 8, 32])]
for n, heads, bs in shapes:
    for b in bs:
        idx = torch.randint(0, entries, (b, n), device=dev)
        q = torch.randn(b, heads, 1, 512, device=dev, dtype=torch.bfloat16)

        def attn(_):
            rows_ = kv[idx].unsqueeze(1)  # [b, 1, n, 512]
            return F.scaled_dot_product_attention(q, rows_.expand(b, heads, n, 512), rows_.expand(b, heads, n, 512),
                                                  scale=0.044)
        us = time_us(attn)
        byt = b * n * 1024 + 2 * b * heads * 512 * 2
        rows.append(("torch gather + SDPA (bf16 rows)", f"b={b} h={heads} slots={n}", us, byt / us / 1e3,
                     2 * b * heads * n * 1024 / us / 1e6))

# Lightning-indexer scores: relu(q . k) weighted over heads.
for nk in ([16384] if quick else [16384, 65536]):
    q = torch.randn(64, 128, device=dev, dtype=torch.bfloat16)
    w = torch.randn(64, device=dev, dtype=torch.bfloat16)
    keys = torch.randn(nk, 128, device=dev, dtype=torch.bfloat16)
    us = time_us(lambda _: (torch.relu(keys @ q.t()) * w).sum(-1))
    rows.append(("torch indexer scores (bf16)", f"{nk} keys, 64 heads", us, nk * 256 / us / 1e3, 2 * nk * 64 * 128 / us / 1e6))

# The same for a decode step's batch: 64 queries, each over its own 16,384 keys (a 64K-token context;
# kernel_bench's "over key runs" rows), keys in bf16 (ours reads them as fp32: twice the bytes).
b, nk = 64, 16384
q = torch.randn(b, 64, 128, device=dev, dtype=torch.bfloat16)
w = torch.randn(b, 64, 1, device=dev, dtype=torch.bfloat16)
keys = torch.randn(b, nk, 128, device=dev, dtype=torch.bfloat16)
us = time_us(lambda _: (torch.relu(torch.bmm(q, keys.transpose(1, 2))) * w).sum(1))
rows.append(("torch indexer scores, batched (bf16)", f"{b} x {nk} keys, 64 heads", us, b * nk * 256 / us / 1e3,
             2 * b * nk * 64 * 128 / us / 1e6))
del q, w, keys

# Top-k of the indexer scores (the candidate list): torch.topk, sorted, on one row.
for nk in ([16384] if quick else [16384, 65536]):
    for k in (512, 2048):
        s = torch.randn(nk, device=dev).bfloat16().float()
        us = time_us(lambda _: torch.topk(s, k, sorted=True))
        rows.append(("torch.topk (sorted)", f"{nk} scores, k={k}", us, nk * 4 / us / 1e3, 0.0))

print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name()}")
print("\n| PyTorch op | shape | time (us) | GB/s | TFLOP/s |\n|---|---|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.2f} |")
