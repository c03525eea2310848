"""One rank of the vocabulary-parallel head tests (tests/test_vocab_parallel.py starts two of these on gloo).

python tests/vocab_parallel_worker.py CASES RANK WORLD STORE OUT: joins the group through the file store STORE, runs
every case of the torch.save'd list CASES on this rank's shard, and saves {case name: outputs or the error} to OUT.
"""
import datetime
import importlib
import sys

import torch
import torch.distributed as dist


def run_case(c, rank):
    import rlhf_kernels as rk
    off, rows = c["shards"][rank]
    start = max(off, 0)  # a negative vocab_offset (a bad-input case) still comes with a real shard
    kw = dict(temperature=c["temperature"], softcap=c["softcap"], ignore_index=c["ignore_index"],
              return_entropy=c["return_entropy"], validate=c["validate"], backend=c["backend"],
              process_group=dist.group.WORLD, vocab_offset=off if c["explicit"] else None)
    if c["op"] == "linear":
        hidden = c["hidden"].clone().requires_grad_()
        w = c["weight"][start:start + rows].clone().requires_grad_(not c.get("frozen"))
        b = None if c["bias"] is None else c["bias"][start:start + rows].clone().requires_grad_()
        lin = importlib.import_module("rlhf_kernels.ops._head")
        keep_rows = lin.valid_rows
        vp = importlib.import_module("rlhf_kernels.ops.vocab_parallel")
        vp.ROWS_PER_STEP = c.get("rows_per_step", 4096)  # small: the bf16 corrections widen hidden in several steps
        if c.get("uncompacted"):  # as on a GPU with validate=False: ignored rows stay in, flagged to the kernels
            lin.valid_rows = lambda *a: None
        try:
            out = rk.linear_logprobs(hidden, w, c["tokens"], bias=b, **kw)
        finally:
            lin.valid_rows = keep_rows
        leaves = dict(dh=hidden, dw=w, db=b)
    else:
        logits = c["logits"].clone().requires_grad_()
        out = rk.logprobs_from_logits(logits[..., start:start + rows], c["tokens"], **kw)
        leaves = dict(dx=logits)
    logp, ent = out if c["return_entropy"] else (out, None)
    loss = (0 if c["c1"] is None else (c["c1"] * logp).nansum()) + (0 if ent is None else (c["c2"] * ent).sum())
    loss.backward()
    res = dict(logp=logp.detach(), ent=None if ent is None else ent.detach())
    for k, t in leaves.items():
        res[k] = None if t is None or t.grad is None else t.grad
    return res


def main(cases_path, rank, world, store, out_path):
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for c in torch.load(cases_path, weights_only=True):
        try:
            results[c["name"]] = run_case(c, rank)
        except (ValueError, TypeError) as e:  # the bad-input cases; every rank must raise alike, or the next case hangs
            results[c["name"]] = dict(error=type(e).__name__, message=str(e))
    torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
