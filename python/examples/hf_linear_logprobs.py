"""Hugging Face Transformers drop-in: log-probs and entropy of sampled tokens from the final hidden
states and `lm_head.weight` with `rk.linear_logprobs`, instead of `outputs.logits` + log_softmax.

The usual path builds `[batch, seq, vocab]` logits, a log-softmax of the same size, and in the
backward their gradient; `rk.linear_logprobs` never allocates anything of size vocab per token.
The model is a small Llama built from a config (no download) with a 32k vocabulary, so the logits
dominate memory the way they do in a real LLM.

    python python/examples/hf_linear_logprobs.py --vocab 32000 --batch 4 --prompt 16 --response 64
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_kernels as rk


def build_model(vocab, hidden, layers, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout, so both paths see the same network


def sample(model, batch, prompt, response, seed):
    """Prompt ids + sampled continuation; min_new_tokens keeps every row full length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g)
    with torch.no_grad():
        return model.generate(prompts, do_sample=True, max_new_tokens=response, min_new_tokens=response,
                              pad_token_id=0)


def logits_path(model, seqs, prompt, temperature):
    """What most trainers do: full logits, log_softmax, gather. Returns (logp, entropy, hidden)."""
    out = model(input_ids=seqs, output_hidden_states=True)
    # the logits of position t score token t + 1; the last position scores nothing we sampled
    logits = out.logits[:, prompt - 1:-1].float() / temperature
    logsm = logits.log_softmax(-1)
    logp = logsm.gather(-1, seqs[:, prompt:, None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy, out.hidden_states[-1]


def fused_path(model, seqs, prompt, temperature):
    """The drop-in: backbone only, then the fused head. Returns (logp, entropy, hidden)."""
    hidden = model.model(input_ids=seqs).last_hidden_state
    logp, entropy = rk.linear_logprobs(hidden[:, prompt - 1:-1], model.lm_head.weight, seqs[:, prompt:],
                                       bias=model.lm_head.bias, temperature=temperature, return_entropy=True)
    return logp, entropy, hidden


def objective(logp, entropy):
    # any scalar using both outputs, so gradients flow through log-probs and entropy alike
    return -logp.mean() - 0.01 * entropy.mean()


def grads(model, path, seqs, prompt, temperature):
    model.zero_grad(set_to_none=True)
    logp, entropy, hidden = path(model, seqs, prompt, temperature)
    hidden.retain_grad()
    objective(logp, entropy).backward()
    return logp.detach(), entropy.detach(), hidden.grad.clone(), model.lm_head.weight.grad.clone()


def peak_bytes(fn):
    """Peak bytes of CPU tensor memory live during `fn` beyond what was live before it, replayed
    from the profiler's allocation events (self usage only, so nested ops are not double-counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_step_bytes(model, path, seqs, prompt, temperature):
    """Peak CPU tensor bytes of one forward+backward step of the whole model (backbone, head,
    loss) beyond what was live before it, from the profiler's allocation events. Parameters and
    their .grad buffers are allocated first so both paths are charged only for the step itself."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        logp, entropy, _ = path(model, seqs, prompt, temperature)
        objective(logp, entropy).backward()

    step()  # warm up lazy initialisations so they are not charged to one path
    return peak_bytes(step)


def main(vocab=32000, hidden=64, layers=2, batch=4, prompt=16, response=64, temperature=0.7, seed=0,
         measure_memory=True):
    """Returns the largest differences between the two paths and, with measure_memory, the peaks."""
    model = build_model(vocab, hidden, layers, seed)
    seqs = sample(model, batch, prompt, response, seed)
    ref = grads(model, logits_path, seqs, prompt, temperature)
    ours = grads(model, fused_path, seqs, prompt, temperature)
    names = ["logp", "entropy", "grad_hidden", "grad_lm_head"]
    result = {f"max_abs_diff_{n}": (a - b).abs().max().item() for n, a, b in zip(names, ref, ours)}
    result.update({f"max_abs_{n}": a.abs().max().item() for n, a in zip(names, ref)})
    result["tokens"] = batch * response
    if measure_memory:
        result["peak_bytes_logits"] = peak_step_bytes(model, logits_path, seqs, prompt, temperature)
        result["peak_bytes_fused"] = peak_step_bytes(model, fused_path, seqs, prompt, temperature)
        result["logits_bytes_fp32"] = batch * response * vocab * 4
    return result


def check(result, rtol=1e-4):
    """Each output of the fused path agrees with the logits path relative to its own magnitude."""
    for n in ["logp", "entropy", "grad_hidden", "grad_lm_head"]:
        diff, scale = result[f"max_abs_diff_{n}"], result[f"max_abs_{n}"]
        assert diff <= rtol * max(scale, 1e-6), f"{n}: max |diff| {diff:.3g} vs max |value| {scale:.3g}"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--response", type=int, default=64)
    a = p.parse_args()
    r = main(a.vocab, a.hidden, a.layers, a.batch, a.prompt, a.response)
    check(r)
    mib = 2 ** 20
    print(f"{r['tokens']} tokens, vocab {a.vocab}: values and gradients match "
          f"(max |Δlogp| {r['max_abs_diff_logp']:.2e}, max |Δgrad lm_head| {r['max_abs_diff_grad_lm_head']:.2e})")
    print(f"peak step memory (CPU tensors, profiler): logits path {r['peak_bytes_logits'] / mib:.1f} MiB, "
          f"rk.linear_logprobs {r['peak_bytes_fused'] / mib:.1f} MiB "
          f"(one fp32 logits tensor is {r['logits_bytes_fp32'] / mib:.1f} MiB)")
