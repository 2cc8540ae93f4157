"""Cross-entropy through the output layer without full-vocabulary logits (Liger's / torchtune's idea).

A language model's last layer maps each position's hidden state (H numbers) to V logits; with V ~ 50k, the
logits of a batch are its largest tensor by far, and autograd keeps them (and their softmax) for backward.
Here the head runs only at positions that carry a label, a chunk of rows at a time, and the backward pass is
done in the same sweep: for each chunk, softmax - one_hot is the loss's gradient with respect to its logits, so
the gradients for the hidden states (and for the head's weight, when it trains) are computed at once and the
chunk's logits are dropped. Peak extra memory: one chunk of logits, not B x T x V. The result equals
`F.cross_entropy(hidden @ W.T + b, targets, reduction="sum")` up to float rounding (tests check it).

    loss_sum, correct = linear_cross_entropy(hidden, head.weight, head.bias, targets)
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MB in fp32): rows = this // vocabulary size


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        rows = torch.arange(min(chunk_rows, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            r = rows[:h.shape[0]]
            logits = h @ weight.t()  # bf16 under autocast: the matmul is the cost, the softmax stays fp32
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits[r, t]).sum()
            correct += (logits.argmax(-1) == t).sum()
            if want_h or want_w or want_b:
                g = torch.exp(logits.sub_(lse.unsqueeze(1)))  # softmax, in place of the logits
                g[r, t] -= 1  # d(loss)/d(logits) of a summed cross-entropy
                if want_h:
                    grad_h[start:start + h.shape[0]] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_w:
                    grad_w += g.t().to(h.dtype) @ h
                if want_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.have = (want_h, want_w, want_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if have else None for have in ctx.have]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of `hidden @ weight.T + bias` against `targets`, how many argmax predictions hit):
    hidden (N, H), weight (V, H), targets (N,). Differentiable in hidden, weight and bias."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss, correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)
    return loss, int(correct)
