"""python -m bench.gpu_report: compile every Triton kernel the launchers select, ahead of time, for real GPU targets,
and read the resource usage of the CUDA kernels in the built extension. No GPU is needed, and none is used.

Each op's plans (rlhf_kernels/triton/_launch.py) are built on `meta` tensors at representative shapes and dtypes;
every distinct launch (kernel, argument types and alignment, constexprs, warps, stages) is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))` for each target, exactly as the launcher would
specialise it at run time. The cubin's resource usage comes from `cuobjdump --dump-resource-usage` (shipped in
Triton's package). Compile-time figures, not measurements: see docs/gpu.md for how to read them.

Fails (exit 1) when a launch the launchers can select does not compile or exceeds a target's limits: dynamic +
static shared memory per block, 255 registers per thread, or registers x threads (allocated per warp in units of
256) above the 64K registers of an SM. Spills (local memory) are reported and never fail: they cost speed, not
correctness, and only a measurement on the GPU (make gpu-check) can say whether they matter.
"""
import argparse
import concurrent.futures as cf
import functools
import glob
import importlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from rlhf_kernels.triton._launch import uses

# Max shared memory per block (opt-in dynamic + static) and the register file, from NVIDIA's CUDA C++ Programming
# Guide, "Compute capabilities" (technical specifications per compute capability).
KB = 1024
SMEM_PER_BLOCK = {80: 163 * KB, 86: 99 * KB, 89: 99 * KB, 90: 227 * KB, 100: 227 * KB, 120: 99 * KB}
REQUIRED_ARCHS = (80, 86, 89, 90)  # A100, RTX 30xx / A10, RTX 40xx / L4, H100 / H200: a Triton without them fails
REGS_PER_THREAD = 255
REGS_PER_SM = 64 * KB
STATIC_SMEM = 48 * KB        # the most a kernel may declare statically (the rest needs dynamic opt-in)
CUDA_MAX_THREADS = 256       # the largest block any launch in csrc/cuda uses (kThreads, kRowThreads, kWarps * 32)

ROW_DTYPES = (torch.float32, torch.float64)  # what the row ops compute in (ops/ cast other inputs to these)
HEAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# the first shape of each list is the one whose value specialisation gets compiled (see `collect`)
HS, VS, NS = (4096, 2048, 8192), (128256, 32000, 151936), (2048, 16384, 1)
ROWS = (64, 4096)            # B x T of the row ops


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# ---- representative calls of each op: [(dtype, shape label, [Launch])] ----
# Flags that only switch code on or off (estimator, aggregation, which gradients) take every value; for
# token_rewards every value of each flag appears, not every combination.

def _row_cases(build):
    B, T = ROWS
    return [(dt, f"{B}x{T}", plan) for dt in ROW_DTYPES for plan in build(B, T, dt)]


def _token_kl(mod):
    def build(B, T, dt):
        a, g = _meta(B, T, dtype=dt), _meta(B, T, dtype=dt)
        for est in (0, 1, 2):
            yield mod.plan_fwd(a, a, est, 0.0)[0]
            yield mod.plan_bwd(g, a, a, est, 0.0)[0]
    return _row_cases(build)


def _group_advantages(mod):
    def build(B, T, dt):
        n = B * T
        s, order, offsets = _meta(n, dtype=dt), _meta(n, dtype=torch.int64), _meta(n + 1, dtype=torch.int64)
        for group_size in (0, 8, 64):  # 0: groups by label
            for baseline in (0, 1, 2):
                for scale in (0, 1):
                    yield mod.plan_fwd(s, order, offsets, group_size, baseline, scale, 1e-6)[0]
    return _row_cases(build)


def _rollout_correction(mod):
    def build(B, T, dt):
        a, m = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool)
        for level in (0, 1, 2):
            for mode in (0, 1):
                yield mod.plan_fwd(a, a, m, level, mode, 0.0, 2.0)[0]
    return _row_cases(build)


def _dpo_loss(mod):
    def build(B, T, dt):
        x = _meta(B * T // 64, dtype=dt)  # one row per pair
        for loss in (0, 1, 2, 3):
            yield mod.plan_fwd(x, x, x, x, 0.1, loss, 0.0)[0]
            yield mod.plan_bwd(x, x, x, x, x, 0.1, loss, 0.0)[0]
    return _row_cases(build)


def _gae(mod):
    def build(B, T, dt):
        x, m = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool)
        yield mod.plan_fwd(x, x, m, None, 1.0, 0.95)[0]
        yield mod.plan_fwd(x, x, m, m, 1.0, 0.95)[0]
    return _row_cases(build)


def _masked_whiten(mod):
    def build(B, T, dt):
        x, m = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool)
        yield mod.plan_fwd(x, m, True, False, 1e-8)[0]
        yield mod.plan_fwd(x, m, False, True, 1e-8)[0]
    return _row_cases(build)


def _ppo_policy_loss(mod):
    def build(B, T, dt):
        x, m, s = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool), _meta(dtype=dt)
        row_adv = _meta(B, dtype=dt)
        for agg in (0, 1, 2, 3):
            yield mod.plan_fwd(x, x, x, m, None, None, 0.2, 0.2, 0.0, agg, 0, 0, 0.0, 2, 0.0)[0]
        # the GRPO-family row kernels: GSPO with weights and the KL term, CISPO with per-row advantages
        yield mod.plan_fwd(x, x, x, m, x, x, 0.2, 0.2, 0.0, 0, 1, 0, 0.1, 2, 0.0)[0]
        yield mod.plan_fwd(x, x, row_adv, m, None, None, 0.2, 0.2, 0.0, 0, 0, 1, 0.0, 2, 0.0)[0]
        for need_adv in (False, True):
            yield mod.plan_bwd(s, x, x, x, m, None, None, _meta(B, dtype=dt), 0.2, 0.2, 0.0, 0, 0, 0.0, 2, False,
                               need_adv)[0]
            yield mod.plan_bwd(s, x, x, x, m, x, x, _meta(B, dtype=dt), 0.2, 0.2, 0.0, 1, 0, 0.1, 2, True, need_adv)[0]
            yield mod.plan_bwd(s, x, x, row_adv, m, None, None, _meta(B, dtype=dt), 0.2, 0.2, 0.0, 0, 1, 0.0, 2, True,
                               need_adv)[0]
    return _row_cases(build)


def _ppo_value_loss(mod):
    def build(B, T, dt):
        x, m, s = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool), _meta(dtype=dt)
        for agg in (0, 1, 2, 3):
            yield mod.plan_fwd(x, x, x, m, 0.2, agg)[0]
        for need_data in (False, True):
            yield mod.plan_bwd(s, x, x, x, m, _meta(B, dtype=dt), 0.2, need_data)[0]
    return _row_cases(build)


def _token_rewards(mod):
    def build(B, T, dt):
        x, m = _meta(B, T, dtype=dt), _meta(B, T, dtype=torch.bool)
        for kl_coef, est, dense, after_eos in ((0.0, 0, False, False), (0.05, 0, True, True), (0.05, 1, False, True),
                                               (0.05, 2, True, False)):
            yield mod.plan_fwd(_meta(B, dtype=dt), m, x, x, kl_coef, est, x if dense else None, 1.0, 0.0, after_eos)[0]
    return _row_cases(build)


def _logprobs_from_logits(mod):
    out = []
    for dt in HEAD_DTYPES:
        for N in NS:
            for V in VS:
                acc = torch.float64 if dt == torch.float64 else torch.float32
                z, tok, r = _meta(N, V, dtype=dt), _meta(N, dtype=torch.int64), _meta(N, dtype=acc)
                for ent in (False, True):
                    out.append((dt, f"N={N} V={V}", mod.plan_fwd(z, tok, 1.0, -100, ent)[0]))
                for gent in (None, r):
                    out.append((dt, f"N={N} V={V}", mod.plan_bwd(r, gent, z, tok, r, r, 1.0, -100)[0]))
                # the sampler replay: the threshold (top-k alone, and top-k with top-p), the head cut at it
                for p in (None, r):
                    out.append((dt, f"N={N} V={V} replay", mod.plan_threshold(z, tok, 1.0, -100, None, 0.0, tok, p)[0]))
                out.append((dt, f"N={N} V={V} replay", mod.plan_fwd(z, tok, 1.0, -100, True, thresholds=r)[0]))
                out.append((dt, f"N={N} V={V} replay", mod.plan_bwd(r, r, z, tok, r, r, 1.0, -100, thresholds=r)[0]))
    return out


def _linear_logprobs(mod):
    """Forward and backward plans at every shape, with and without bias / entropy gradient; fp32 both with
    and without TF32 (the launcher follows torch's flag, so both variants are selectable)."""
    out = []
    for dt in HEAD_DTYPES:
        acc = torch.float64 if dt == torch.float64 else torch.float32
        for tf32 in ((False, True) if dt == torch.float32 else (None,)):
            for H in HS:
                for V in VS:
                    for N in NS:
                        h, w, tok = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(N, dtype=torch.int64)
                        r = _meta(N, dtype=acc)
                        for bias, gent in ((None, None), (_meta(V, dtype=acc), r)):
                            label = (f"N={N} H={H} V={V}" + (" bias+entropy" if bias is not None else "")
                                     + (" tf32" if tf32 else ""))
                            fwd = mod.plan_fwd(h, w, bias, tok, r, r, r, allow_tf32=tf32)
                            # batch_invariant changes the forward's grid (its vocabulary splits), not its kernels
                            fwd_inv = mod.plan_fwd(h, w, bias, tok, r, r, r, batch_invariant=True, allow_tf32=tf32)
                            bwd = mod.plan_bwd(r, gent, h, w, bias, tok, r, r, _meta(N, H, dtype=dt),
                                               _meta(V, H, dtype=dt), bias, allow_tf32=tf32)
                            out += [(dt, label, fwd), (dt, label + " batch_invariant", fwd_inv), (dt, label, bwd)]
    return out


def _fixed_gemm(mod):
    """The batch-invariant replay's three products per row block (rlhf_kernels/ops/_replay_head.py): the logits
    a·bᵀ over H, d(hidden) over V, d(W) over the block's rows; fp32 with and without TF32."""
    out = []
    for dt in ROW_DTYPES:
        for tf32 in ((False, True) if dt == torch.float32 else (None,)):
            for H, V, N in zip(HS, VS, (1024, 512, 1)):
                label = f"N={N} H={H} V={V}" + (" tf32" if tf32 else "")
                h, w, dz = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(N, V, dtype=dt)
                out += [(dt, label + " logits", mod.plan_fwd(h, w, True, allow_tf32=tf32)[0]),
                        (dt, label + " d(hidden)", mod.plan_fwd(dz, w, False, allow_tf32=tf32)[0]),
                        (dt, label + " d(W)", mod.plan_fwd(_meta(V, N, dtype=dt), h, False, allow_tf32=tf32)[0])]
    return out


OPS = {"token_kl": _token_kl, "dpo_loss": _dpo_loss, "gae": _gae, "masked_whiten": _masked_whiten,
       "ppo_policy_loss": _ppo_policy_loss, "ppo_value_loss": _ppo_value_loss, "token_rewards": _token_rewards,
       "logprobs_from_logits": _logprobs_from_logits, "linear_logprobs": _linear_logprobs,
       "group_advantages": _group_advantages, "rollout_correction": _rollout_correction, "fixed_gemm": _fixed_gemm}


class _ForArch:
    """A launcher module whose plan functions are called for one target (`arch`: the compute capability as an int,
    80 ... 120, as in triton's GPUTarget): a module may choose its configurations per target."""

    def __init__(self, mod, arch):
        self.mod, self.arch = mod, arch

    def __getattr__(self, name):
        f = getattr(self.mod, name)
        return functools.partial(f, arch=self.arch) if name.startswith("plan_") else f


def cases(op, arch=None):
    """[(dtype, shape label, [Launch])]: the plans of `op`'s representative calls for target `arch`, on meta
    tensors."""
    return OPS[op](_ForArch(importlib.import_module(f"rlhf_kernels.triton.{op}"), arch))


# ---- launches -> compile units ----

def kernel_name(kernel):
    return kernel.fn.__name__


def selectable(mod, launch, dtype, arch):
    """Whether `launch` uses a configuration its module lists for (dtype, arch)."""
    return any(uses(launch, c) for c in mod.configs(dtype, arch))


def launch_key(launch):
    """What decides the compiled binary, as the Triton runtime specialises the launch: argument types, 16-byte
    alignment / divisibility, ints equal to 1 and None arguments become constants."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends import backends

    backend = backends["nvidia"].compiler
    fn = launch.kernel
    values = dict(zip(fn.arg_names, launch.args))
    values.update(launch.constexprs)
    sig, consts, attrs = [], [], []
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        if name not in values:
            raise TypeError(f"{fn.fn.__name__}: the plan gives no value for {name!r}")
        v = values[name]
        if p.is_constexpr:
            sig.append((name, "constexpr"))
            consts.append((name, v))
            continue
        ty, attr = native_specialize_impl(backend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig.append((name, ty))
        if ty == "constexpr":
            consts.append((name, attr))
        elif isinstance(attr, str) and attr:
            attrs.append((i, tuple(tuple(x) for x in backend.parse_attr(attr))))
    return (fn.fn.__module__, fn.fn.__name__, tuple(sig), tuple(consts), tuple(attrs), launch.num_warps,
            launch.num_stages)


def variant(key):
    """A launch key without the runtime's value specialisations (ints equal to 1, None, 16-divisibility): the
    kernel, its argument types, its own constexprs, warps and stages."""
    module, name, sig, consts, attrs, warps, stages = key
    fn = getattr(importlib.import_module(module), name)
    own = {p.name for p in fn.params if p.is_constexpr}
    types = tuple((n, "i32" if t == "constexpr" else t) for n, t in sig if n not in own)  # 1 is an i32
    return module, name, types, tuple((n, v) for n, v in consts if n in own), warps, stages


def _tool(name):
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def resource_usage(binary_path):
    """{function name: {REG, SHARED, LOCAL, STACK, arch}} from `cuobjdump --dump-resource-usage` (LOCAL: bytes of
    thread-local memory, where ptxas puts spilled registers)."""
    r = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", binary_path], capture_output=True, text=True)
    if r.returncode != 0 and "does not contain device code" in r.stdout + r.stderr:
        return {}  # a CPU-only build of the extension
    r.check_returncode()
    out = r.stdout
    res, arch = {}, None
    for line in out.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if "REG:" in line:
            vals = dict((k, int(v)) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            res.setdefault(arch, {})[name] = {k: vals.get(k, 0) for k in ("REG", "SHARED", "LOCAL", "STACK")}
    return res


def regs_fit(regs, threads):
    """Registers are allocated per warp in units of 256: the block fits when all its warps fit in one SM."""
    per_warp = -(-regs * 32 // 256) * 256
    return per_warp * (-(-threads // 32)) <= REGS_PER_SM


def compile_unit(unit):
    """Compile one launch key for one target; {compiled, shared, regs, local, error, seconds}."""
    key, arch = unit
    module, name, sig, consts, attrs, warps, stages = key
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    opts = {"num_warps": warps}
    if stages is not None:
        opts["num_stages"] = stages
    src = ASTSource(fn, dict(sig), dict(consts), {(i,): [list(a) for a in attr] for i, attr in attrs})
    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # the report's subject: a kernel that does not compile for this target
        msg = " ".join(str(e).split())  # Triton puts the source first and the reason last: keep both ends
        msg = msg if len(msg) <= 700 else f"{msg[:200]} ... {msg[-500:]}"
        return {"compiled": False, "error": f"{type(e).__name__}: {msg}",
                "seconds": round(time.perf_counter() - t0, 2)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = next(iter(next(iter(resource_usage(f.name).values())).values()))
    return {"compiled": True, "shared": k.metadata.shared + usage["SHARED"], "regs": usage["REG"],
            "local": usage["LOCAL"] + usage["STACK"], "num_stages": k.metadata.num_stages,
            "seconds": round(time.perf_counter() - t0, 2)}


def check(res, arch, threads):
    """The limits a compiled kernel breaks on `arch` (empty: fits)."""
    if not res["compiled"]:
        return ["does not compile: " + res["error"]]
    bad = []
    if res["shared"] > SMEM_PER_BLOCK[arch]:
        bad.append(f"shared memory {res['shared'] / KB:.1f} KB > {SMEM_PER_BLOCK[arch] // KB} KB")
    if res["regs"] > REGS_PER_THREAD:
        bad.append(f"{res['regs']} registers/thread > {REGS_PER_THREAD}")
    elif not regs_fit(res["regs"], threads):
        bad.append(f"{res['regs']} registers x {threads} threads > {REGS_PER_SM}")
    return bad


def supported_archs(wanted):
    """(the wanted targets this Triton compiles for, {target: why not}); sm_100/sm_120 need a Triton that knows
    them, the others are required (see `run_report`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlhf_kernels.triton.token_kl import _token_kl_fwd_kernel as probe

    out, skipped = [], {}
    for arch in wanted:
        sig = {"logp_ptr": "*fp32", "ref_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "clamp": "fp32",
               "estimator": "constexpr", "BLOCK": "constexpr"}
        try:
            triton.compile(ASTSource(probe, sig, {"estimator": 0, "BLOCK": 128}), target=GPUTarget("cuda", arch, 32))
            out.append(arch)
        except Exception as e:  # an unknown target
            skipped[arch] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return out, skipped


# ---- CUDA kernels of the built extension ----

def _kernel_names(mangled):
    """{mangled: kernel name without namespaces, template arguments and parameters} (c++filt demangles)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {m: m for m in mangled}
    out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    names = {}
    for m, d in zip(mangled, out):
        d = d.replace("(anonymous namespace)::", "").removeprefix("void ")
        names[m] = re.split(r"[<(]", d, maxsplit=1)[0].split("::")[-1]
    return names


def cuda_report(so_path):
    """[{kernel, arch, REG, SHARED, LOCAL, STACK, failures}] of every kernel in the extension's cubins."""
    rows = []
    usage = resource_usage(so_path)
    names = _kernel_names(sorted({n for funcs in usage.values() for n in funcs}))
    for arch, funcs in sorted(usage.items(), key=lambda kv: kv[0] or 0):
        for name, u in sorted(funcs.items()):
            bad = []
            if u["REG"] > REGS_PER_THREAD:
                bad.append(f"{u['REG']} registers/thread > {REGS_PER_THREAD}")
            elif not regs_fit(u["REG"], CUDA_MAX_THREADS):
                bad.append(f"{u['REG']} registers x {CUDA_MAX_THREADS} threads > {REGS_PER_SM}")
            if u["SHARED"] > STATIC_SMEM:
                bad.append(f"static shared memory {u['SHARED']} B > {STATIC_SMEM} B")
            rows.append(dict(kernel=names[name], mangled=name, arch=arch, failures=bad, **u))
    return rows


def find_extension():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(root, "rlhf_kernels", "_C*.so")))
    return found[0] if found else None


# ---- the report ----

def collect(ops, archs):
    """{launch key: {archs, ops, dtypes, shapes, specialisations, selectable}} over every op's representative plans
    for each target.

    Launches that differ only in the runtime's value specialisations (an int equal to 1 at N=1, a size not divisible
    by 16) are one variant, compiled once, at the first shape that produced it (the shape lists start with the
    common case): those specialisations change constants in the code, not its tiles, warps or stages, and
    compiling each would multiply the report's time."""
    units, first = {}, {}
    for op in ops:
        mod = importlib.import_module(f"rlhf_kernels.triton.{op}")
        for arch in archs:
            for dt, label, plan in cases(op, arch):
                if not plan:
                    raise AssertionError(f"{op}: empty plan at {label} {dt} for sm_{arch}")
                for launch in plan:
                    full = launch_key(launch)
                    key = first.setdefault(variant(full), full)
                    u = units.setdefault(key, {"archs": set(), "ops": set(), "dtypes": set(), "shapes": set(),
                                               "selectable": True, "specialisations": set()})
                    u["archs"].add(arch)
                    u["specialisations"].add(full)
                    u["ops"].add(op)
                    u["dtypes"].add(str(dt).replace("torch.", ""))
                    u["shapes"].add(label)
                    u["selectable"] = u["selectable"] and selectable(mod, launch, dt, arch)
    return units


def _cell(r, fails):
    if not r["compiled"]:
        return "**does not compile**"
    text = f"{r['regs']} / {r['shared'] / KB:.0f} / {r['local']}"
    return f"**{text}: {'; '.join(fails)}**" if fails else text


def markdown(report, detail):
    """The Triton table (one row per op, kernel and dtype: the worst figure over its compiled variants, or every
    variant with `detail`) and the CUDA table (per kernel and arch, the worst over its template instances)."""
    archs = report["archs"]
    lines = [f"Triton {report['triton_version']}: {len(report['triton'])} distinct launches x {len(archs)} targets "
             f"compiled ahead of time ({report['compiles']} compiles, {report['seconds']:.0f} s wall, "
             f"{report.get('cpu_seconds', 0):.0f} s CPU on the machine that ran it). Each cell: registers/thread / "
             "shared memory KB (dynamic + static) / local (spill) bytes per thread. Limits: shared memory per block "
             + ", ".join(f"sm_{a} {SMEM_PER_BLOCK[a] // KB} KB" for a in archs)
             + f"; {REGS_PER_THREAD} registers/thread; registers x threads <= {REGS_PER_SM}.", ""]
    for arch, why in report["archs_skipped"].items():
        lines.append(f"sm_{arch} not compiled: this Triton does not support it ({why}).")
    head = ["op", "kernel", "dtype", "warps", "variants"] + [f"sm_{a}" for a in archs]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for u in report["triton"]:
        for dt in u["dtypes"]:
            gkey = (u["ops"][0], u["kernel"], dt, u["num_warps"])
            if detail:
                gkey += (json.dumps(u["constexprs"]), json.dumps(u["signature"]))
            groups.setdefault(gkey, []).append(u)
    for gkey, us in sorted(groups.items()):
        cells = []
        for a in archs:
            rs = [(u["results"][str(a)], u["failures"].get(str(a), [])) for u in us if str(a) in u["results"]]
            worst = [r for r in rs if r[1]]
            if not rs:
                cells.append("-")  # a configuration this target's plans do not select
            elif worst:
                cells.append(_cell(*worst[0]))
            else:
                cells.append(f"{max(r['regs'] for r, _ in rs)} / {max(r['shared'] for r, _ in rs) / KB:.0f} / "
                             f"{max(r['local'] for r, _ in rs)}")
        variants = "; ".join(f"{k}={v}" for k, v in json.loads(gkey[4]).items()) if detail else str(len(us))
        lines.append("| " + " | ".join([gkey[0], gkey[1], gkey[2], str(gkey[3]), variants] + cells) + " |")
    if report.get("cuda"):
        c = report["cuda"]
        lines += ["", f"CUDA kernels of `{c['extension']}` (`cuobjdump --dump-resource-usage`): registers/thread / "
                  "static shared memory bytes / local (spill) bytes per thread, the worst over each kernel's template "
                  f"instances. Blocks are at most {CUDA_MAX_THREADS} threads and use no dynamic shared memory.", ""]
        karchs = sorted({r["arch"] for r in c["kernels"]})
        lines += ["| kernel | instances | " + " | ".join(f"sm_{a}" for a in karchs) + " |",
                  "|---|---|" + "---|" * len(karchs)]
        by = {}
        for r in c["kernels"]:
            by.setdefault(r["kernel"], {}).setdefault(r["arch"], []).append(r)
        for name, per in sorted(by.items()):
            cells = []
            for a in karchs:
                rs = per.get(a, [])
                fails = [f for r in rs for f in r["failures"]]
                cells.append("-" if not rs else (f"**{'; '.join(fails)}**" if fails else
                             f"{max(r['REG'] for r in rs)} / {max(r['SHARED'] for r in rs)} / "
                             f"{max(r['LOCAL'] + r['STACK'] for r in rs)}"))
            lines.append(f"| `{name}` | {max(len(v) for v in per.values())} | " + " | ".join(cells) + " |")
    elif report.get("cuda_skipped"):
        lines += ["", f"CUDA kernels: not reported ({report['cuda_skipped']})."]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- gpu-report begin -->", "<!-- gpu-report end -->"


def replace_between(path, begin, end, text):
    """Replace what lies between the `begin` and `end` markers of a generated section of `path` (BENCHMARKS.md)."""
    with open(path) as f:
        old = f.read()
    if begin not in old or end not in old:
        raise SystemExit(f"{path} has no '{begin}' ... '{end}' section: add it first")
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}{end}{tail}")


def run_report(ops, archs, jobs, cuda=True):
    import triton

    t0 = time.perf_counter()
    archs, archs_skipped = supported_archs(archs)
    units = collect(ops, archs)
    work = [(key, a) for key, u in units.items() for a in sorted(u["archs"])]
    # the head's GEMM kernels compile slowest: start them first so the processes finish together
    work.sort(key=lambda w: "linear_logprobs" not in units[w[0]]["ops"])
    results = {}
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            for w, r in zip(work, pool.map(compile_unit, work, chunksize=1)):
                results[w] = r
    else:
        for w in work:
            results[w] = compile_unit(w)
    triton_rows = []
    failures = [f"sm_{a}: this Triton cannot compile for it ({why})" for a, why in archs_skipped.items()
                if a in REQUIRED_ARCHS]
    for key, u in units.items():
        module, name, sig, consts, attrs, warps, stages = key
        threads = warps * 32
        res = {str(a): results[(key, a)] for a in sorted(u["archs"])}
        fails = {str(a): check(results[(key, a)], a, threads) for a in sorted(u["archs"])}
        fails = {a: f for a, f in fails.items() if f}
        row = {"kernel": name, "module": module, "ops": sorted(u["ops"]), "dtypes": sorted(u["dtypes"]),
               "shapes": sorted(u["shapes"]), "signature": dict(sig), "constexprs": {k: repr(v) for k, v in consts},
               "divisible_by_16": [sig[i][0] for i, _ in attrs],
               "num_warps": warps, "num_stages": stages, "in_configs": u["selectable"],
               "value_specialisations_seen": len(u["specialisations"]), "results": res,
               "failures": fails}
        triton_rows.append(row)
        for a, f in fails.items():
            failures.append(f"{name} ({', '.join(row['dtypes'])}; {row['constexprs']}) on sm_{a}: {'; '.join(f)}")
        if u["selectable"] is False:
            failures.append(f"{name} ({row['constexprs']}): launched with a configuration missing from its module's "
                            "configs()")
    report = {"what": "compile-time resource usage (not measurements)", "triton_version": triton.__version__,
              "archs": archs, "archs_skipped": {str(k): v for k, v in archs_skipped.items()},
              "limits": {"shared_memory_per_block": {str(a): SMEM_PER_BLOCK[a] for a in archs},
                         "registers_per_thread": REGS_PER_THREAD, "registers_per_sm": REGS_PER_SM},
              "triton": triton_rows, "compiles": len(work)}
    if cuda:
        so = find_extension()
        tool = _tool("cuobjdump")
        if so is None:
            report["cuda_skipped"] = "the extension rlhf_kernels/_C*.so is not built"
        elif tool is None:
            report["cuda_skipped"] = "no cuobjdump found"
        else:
            kernels = cuda_report(so)
            report["cuda"] = {"extension": os.path.basename(so), "kernels": kernels}
            if not kernels:
                report["cuda_skipped"] = "the extension holds no CUDA kernels (a CPU-only build)"
                del report["cuda"]
            for r in kernels:
                for f in r["failures"]:
                    failures.append(f"CUDA {r['kernel']} on sm_{r['arch']}: {f}")
    spills = sorted({f"{r['kernel']} ({', '.join(r['dtypes'])}) sm_{a}: {v['local']} B"
                     for r in triton_rows for a, v in r["results"].items() if v.get("compiled") and v["local"]})
    report["spills"] = spills
    report["failures"] = failures
    report["seconds"] = round(time.perf_counter() - t0, 1)
    # CPU time of this process and its compilers (ptxas included): on a shared machine the wall time is not
    # what an idle CI runner would take, and cpu_seconds / jobs is
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_seconds"] = round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 1)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--archs", nargs="*", type=int, default=list(SMEM_PER_BLOCK), choices=list(SMEM_PER_BLOCK))
    p.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    p.add_argument("--json", default="gpu_report.json")
    p.add_argument("--md", default="gpu_report.md", help="the full table (every compiled variant)")
    p.add_argument("--benchmarks", default=None, help="also put the summary table into this BENCHMARKS.md")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of the built extension")
    p.add_argument("--from-json", default=None, help="render the tables of an earlier report instead of compiling")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            report = json.load(f)
    else:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            p.error("run without TRITON_INTERPRET=1: the interpreter replaces the compiler this report exercises")
        report = run_report(a.ops, a.archs, a.jobs, cuda=not a.no_cuda)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    summary = markdown(report, detail=False)
    with open(a.md, "w") as f:
        f.write("# GPU compile report (compile-time resource figures, not measurements)\n\n" + summary + "\n"
                + markdown(report, detail=True))
    if a.benchmarks:
        replace_between(a.benchmarks, BEGIN, END, summary)
    print(summary)
    for s in report["spills"]:
        print(f"spill (reported, not a failure): {s}")
    for f in report["failures"]:
        print(f"FAIL: {f}")
    print(f"{report['compiles']} compiles, {report['seconds']:.0f} s wall, {report.get('cpu_seconds', 0):.0f} s CPU; "
          f"wrote {'' if a.from_json else a.json + ' and '}{a.md}"
          + (f", updated {a.benchmarks}" if a.benchmarks else ""))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
