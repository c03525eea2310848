"""How every Triton launcher runs its kernels.

A launcher builds a *plan*: the list of `Launch`es it is about to make for the given tensors. It then
`run`s the plan under a device guard, so kernels start on the inputs' GPU (not the current one) in a
multi-GPU process. The GPU compile report builds the same plans on `meta` tensors of representative
shapes and compiles each launch ahead of time for real GPU targets: what is reported is exactly what
the launcher would launch, by construction.
"""
import contextlib
from typing import NamedTuple

import torch
from torch.library import wrap_triton


class Launch(NamedTuple):
    kernel: object            # a @triton.jit function
    grid: tuple               # program counts per grid axis
    args: tuple               # runtime arguments in the kernel's order: tensors, ints, floats, None
    constexprs: dict          # the kernel's tl.constexpr arguments, by name
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default


def uses(launch, config):
    """Whether `launch` runs `config`, a dict every launcher module lists in its `configs(dtype, arch)`: the
    kernel's name, its tile constexprs, num_warps and optionally num_stages."""
    if config.get("kernel") != launch.kernel.fn.__name__:
        return False
    return all((getattr(launch, k) if k in ("num_warps", "num_stages") else launch.constexprs.get(k)) == v
               for k, v in config.items() if k != "kernel")


def device_guard(device):
    """Makes `device` the current CUDA device for the launches inside; a no-op for other devices."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run(plan, device):
    """Launches a plan's kernels, in order, on `device`."""
    with device_guard(device):
        for launch in plan:
            opts = {"num_warps": launch.num_warps}
            if launch.num_stages is not None:
                opts["num_stages"] = launch.num_stages
            wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.constexprs, **opts)


def execute(planned, device):
    """Runs the plan of a plan function's `(plan, outputs)` on `device` and returns the outputs."""
    plan, outputs = planned
    run(plan, device)
    return outputs


def powers_of_two(cap):
    """1, 2, 4, ..., cap: the tiles a launcher that rounds a length up to a power of two (capped) can pick."""
    return [1 << i for i in range(cap.bit_length())]
