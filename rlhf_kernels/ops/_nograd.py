"""Autograd registration for the ops that have no gradient (gae, token_rewards, masked_whiten).

Without an autograd formula torch's fallback lets `backward()` run through the op with only a
warning, silently giving no gradient to its inputs. Registering a backward that raises turns that
into an error at the moment a gradient would be lost. Calling the op on tensors that require grad
stays fine as long as nothing backpropagates into its result.
"""


def raise_on_backward(op, name):
    """Register on `op` (a C++ op name or a triton_op) a backward that raises, naming the public `name`."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"rk.{name} is not differentiable: its outputs are constants of the rollout. Detach its inputs "
            f"(e.g. values.detach()) or call it under torch.no_grad() before using the result in a loss.")

    if isinstance(op, str):
        import torch
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    else:
        op.register_autograd(backward, setup_context=setup_context)
