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


def _compute_dtype(t: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick here: the backward pass (run outside autocast) casts the same way."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target] per row. Unlike the cross-entropy above, the caller's gradient is
    per row and unknown in forward, so backward recomputes each chunk's logits (one more head matmul) from the
    saved hidden states and log-sum-exps instead of keeping N x V logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        dtype = _compute_dtype(hidden, weight)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = _chunk_logits(hidden[start:start + chunk_rows], w, b)
            t = targets[start:start + chunk_rows]
            lse[start:start + t.shape[0]] = torch.logsumexp(logits, dim=-1)
            out[start:start + t.shape[0]] = logits.gather(1, t.unsqueeze(1)).squeeze(1) - lse[start:start + t.shape[0]]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[start:start + ctx.chunk_rows]
            n = h.shape[0]
            g = torch.exp(_chunk_logits(h, w, b).sub_(lse[start:start + n].unsqueeze(1)))  # softmax
            g.neg_()
            g[torch.arange(n, device=g.device), targets[start:start + n]] += 1  # d logp / d logits = onehot - softmax
            g.mul_(grad_out[start:start + n].float().unsqueeze(1))
            if want_h:
                grad_h[start:start + n] = (g.to(ctx.dtype) @ w).to(hidden.dtype)
            if want_w:
                grad_w += g.t().to(ctx.dtype) @ h.to(ctx.dtype)
            if want_b:
                grad_b += g.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    logits = h.to(w.dtype) @ w.t()
    return (logits if b is None else logits + b).float()


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row log-probability of `targets` under softmax(hidden @ weight.T + bias), float32 (N,), without N x V
    logits kept for backward: what DPO's and GRPO's sequence log-probs need. Differentiable in hidden, weight
    and bias."""
    if hidden.shape[0] == 0:
        return hidden.sum(-1).float() * 0.0
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, rows)
