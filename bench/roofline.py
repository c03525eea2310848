"""python -m bench.roofline: roofline predictions of each op's GPU time, from the bytes it must move and the FLOPs it
must run at representative shapes, and the published peak bandwidth and throughput of an A100 and an H100.

Predictions, never measurements: time = max(bytes / HBM bandwidth, FLOPs / peak FLOP/s). This is a lower bound; it
leaves out launch latency (a few microseconds per kernel, which dominates the small row ops), caches (an input of a
few MB stays in the 40-50 MB L2) and how far a kernel gets from the peaks. `rlhf-kernels bench` on a GPU prints
measured/predicted for each row (bench/common.py), so the distance from the roofline is read from a real run.

Peaks (dense, no sparsity), from NVIDIA's datasheets:
- A100-SXM4-80GB: NVIDIA A100 Tensor Core GPU datasheet (2021, nvidia.com/a100): HBM2e 2,039 GB/s; FP32 19.5
  TFLOP/s; TF32 156 (312 with sparsity); BF16/FP16 312 (624 with sparsity).
- H100-SXM5-80GB: NVIDIA H100 Tensor Core GPU datasheet (2023, nvidia.com/h100): HBM3 3.35 TB/s; FP32 67
  TFLOP/s; TF32 494 (989 with sparsity); BF16/FP16 989 (1,979 with sparsity).
"""
import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    name_parts: tuple  # what torch.cuda.get_device_name() contains on this part
    bandwidth: float   # bytes/s
    flops: dict        # dtype -> dense FLOP/s: "fp32" (IEEE), "tf32", "bf16", "fp16"


T = 1e12
GPUS = (Gpu("A100-SXM4-80GB", ("A100", "80GB"), 2.039e12,
            {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T}),
        Gpu("H100-SXM5", ("H100",), 3.35e12, {"fp32": 67 * T, "tf32": 494 * T, "bf16": 989 * T, "fp16": 989 * T}))


def gpu_named(device_name):
    """The Gpu whose datasheet describes `device_name` (torch.cuda.get_device_name()), or None. An A100 40GB or a
    PCIe H100 has other figures, so only the two parts above match (an H100 PCIe reports 'H100 PCIe')."""
    if "PCIe" in device_name:
        return None
    return next((g for g in GPUS if all(p in device_name for p in g.name_parts)), None)


def predict(gpu, nbytes, flops, dtype="fp32"):
    """Roofline time in seconds: the slower of moving `nbytes` through HBM and running `flops` at `dtype`'s peak."""
    return max(nbytes / gpu.bandwidth, (flops or 0) / gpu.flops[dtype])


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    dtype: str          # the dtype whose peak the FLOPs run at
    nbytes: float
    flops: float
    why: str


def cases():
    """Each op, forward + backward where it has one, at a representative GPU shape. Bytes: every input read once
    and every output written once by each pass (what a fused kernel must move; 1 byte per bool mask element).
    FLOPs: multiplies and adds, an exp or log counted as one."""
    out = []
    BT = 64 * 4096
    out.append(Case("token_kl (k3)", "64x4096", "fp32", 8 * 4 * BT, 8 * BT,
                    "fwd reads logp, ref, writes kl; bwd reads grad, logp, ref, writes 2 grads"))
    out.append(Case("token_rewards (k3 + dense)", "64x4096", "fp32", (4 * 4 + 1) * BT, 8 * BT,
                    "reads mask, logp, ref, dense; writes rewards"))
    out.append(Case("gae", "64x4096", "fp32", (4 * 4 + 1) * BT, 10 * BT,
                    "reads rewards, values, mask; writes advantages, returns"))
    out.append(Case("masked_whiten", "64x4096", "fp32", (2 * (4 + 1) + 4) * BT, 6 * BT,
                    "the mean is needed before the first output: x and mask are read twice, the output written"))
    out.append(Case("ppo_policy_loss", "64x4096", "fp32", ((3 * 4 + 1) + (3 * 4 + 1 + 4)) * BT, 20 * BT,
                    "fwd reads logp, old, adv, mask; bwd reads them again and writes d logp"))
    out.append(Case("ppo_value_loss", "64x4096", "fp32", ((3 * 4 + 1) + (3 * 4 + 1 + 4)) * BT, 14 * BT,
                    "fwd reads values, old, returns, mask; bwd reads them again and writes d values"))
    P = 4096
    out.append(Case("dpo_loss (sigmoid)", f"{P} pairs", "fp32", (7 + 9) * 4 * P, 30 * P,
                    "fwd reads 4 log-probs, writes loss and 2 rewards; bwd reads grad and 4, writes 4"))
    for N, V, dt, size in ((16384, 128256, "bf16", 2), (16384, 128256, "fp32", 4), (2048, 151936, "bf16", 2)):
        out.append(Case("logprobs_from_logits", f"N={N} V={V}", dt, 3 * N * V * size, 12 * N * V,
                        "fwd reads the logits; bwd reads them again and writes their gradient"))
    for N, H, V, dt in ((16384, 4096, 128256, "bf16"), (2048, 4096, 128256, "bf16"), (16384, 8192, 151936, "bf16"),
                        (2048, 4096, 128256, "fp32"), (2048, 4096, 128256, "tf32")):
        size = 2 if dt == "bf16" else 4
        out.append(Case("linear_logprobs", f"N={N} H={H} V={V}", dt, 3 * (N + V) * H * size, 8 * N * V * H,
                        "4 GEMMs of 2NVH: logits, their recompute in backward, d hidden, d weight "
                        "(the [N, V] logits never stored); bytes: hidden and weight read, their gradients written"))
    return out


def _fmt_time(s):
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table():
    head = ["op", "shape", "dtype", "bytes", "FLOPs", "FLOP/byte"] + [f"predicted {g.name}" for g in GPUS] + ["bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases():
        times = [predict(g, c.nbytes, c.flops, c.dtype) for g in GPUS]
        bound = "compute" if c.flops / GPUS[0].flops[c.dtype] > c.nbytes / GPUS[0].bandwidth else "memory"
        lines.append("| " + " | ".join([c.op, c.shape, c.dtype, f"{c.nbytes / 1e6:.1f} MB", f"{c.flops:.3g}",
                                        f"{c.flops / c.nbytes:.3g}"] + [_fmt_time(t) for t in times] + [bound]) + " |")
    notes = [f"- {c.op}: {c.why}" for c in {c.op: c for c in cases()}.values()]
    return "\n".join(lines) + "\n\nWhat each row counts:\n" + "\n".join(notes) + "\n"


BEGIN, END = "<!-- roofline begin -->", "<!-- roofline end -->"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n")[0])
    p.add_argument("--benchmarks", default=None, help="put the table into this BENCHMARKS.md (between its markers)")
    a = p.parse_args(argv)
    text = table()
    print(text)
    if a.benchmarks:
        from .gpu_report import replace_between
        replace_between(a.benchmarks, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
