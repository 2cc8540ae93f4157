"""Label models: combine the noisy votes of labeling functions into one probability per class, without gold.

The label matrix L is (n rows, m functions) of ints: a class id 0..K-1, or ABSTAIN (-1).

Majority vote (the baseline): each row's distribution is its vote counts, normalised; ties split evenly.

Dawid–Skene (Dawid & Skene, 1979), fitted by EM. Each function j has a confusion matrix
theta_j (K, K+1): theta_j[k, l] = P(function j outputs l | true class k), where l = K stands for
"abstains". Treating abstain as an outcome matters for heuristics: a keyword rule for `sport` fires on
sport articles far more often than on others, so its silence is evidence too. The class balance
pi_k = P(y = k) is estimated with the rest (or fixed, when given). Then, with functions conditionally
independent given the class,

    P(y = k | L_i) ∝ pi_k * prod_j theta_j[k, L_ij]

E-step: these posteriors; M-step: pi and theta from the posterior-weighted counts. EM starts from majority
vote, which fixes which class is which (the model alone is symmetric under relabelling). The M-step adds a
weak Dirichlet prior on each theta_j, worth `prior_strength` rows per class: the function is right
`prior_accuracy` of the times it votes, at the rate it votes in the data. Without it, the likelihood is
flat along directions EM then drifts in (a class no function votes for, or one-class keyword rules that
could as well be read as voting against their class); with a few hundred rows it barely moves the fit.
`smoothing` pseudo-counts on every outcome keep a rare outcome's probability above 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ABSTAIN = -1


@dataclass
class DawidSkene:
    """A fitted Dawid–Skene model: what `posterior` needs to label new rows."""
    class_balance: np.ndarray  # (K,) P(y = k)
    confusions: np.ndarray  # (m, K, K+1) P(output l | class k); column K = abstain
    iterations: int
    log_likelihood: float
    converged: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_balance)

    def accuracies(self) -> np.ndarray:
        """(m,) each function's estimated accuracy when it votes: P(output = y | output != abstain)."""
        pi, theta = self.class_balance, self.confusions
        right = np.einsum("k,mkk->m", pi, theta[:, :, :-1])
        votes = np.einsum("k,mk->m", pi, 1 - theta[:, :, -1])
        return right / np.maximum(votes, 1e-12)

    def posterior(self, L: np.ndarray) -> np.ndarray:
        """(n, K) P(y | votes) for the rows of a label matrix with the same functions."""
        return _posterior(_outcomes(L, self.num_classes), np.log(self.class_balance), np.log(self.confusions))[0]


def _outcomes(L: np.ndarray, k: int) -> np.ndarray:
    """L with ABSTAIN mapped to column K, checked: every value is a class id or ABSTAIN."""
    L = np.asarray(L)
    if L.ndim != 2:
        raise ValueError(f"the label matrix must be 2-D (rows, functions), got shape {L.shape}")
    bad = (L < ABSTAIN) | (L >= k)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"label matrix row {i}, function {j}: {int(L[i, j])} is neither a class id 0..{k - 1} "
                         f"nor ABSTAIN ({ABSTAIN})")
    return np.where(L == ABSTAIN, k, L).astype(np.int64)


def _posterior(out: np.ndarray, log_pi: np.ndarray, log_theta: np.ndarray) -> tuple[np.ndarray, float]:
    """E-step: (n, K) posteriors and the data's log-likelihood under (pi, theta)."""
    n, m = out.shape
    logp = np.tile(log_pi, (n, 1))  # (n, K)
    for j in range(m):
        logp += log_theta[j][:, out[:, j]].T  # (K, n) -> (n, K): log P(L_ij | y = k)
    top = logp.max(axis=1, keepdims=True)
    norm = top + np.log(np.exp(logp - top).sum(axis=1, keepdims=True))
    return np.exp(logp - norm), float(norm.sum())


def majority_vote(L: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, K) vote shares per row; ties split evenly; rows without a vote are uniform (and have no label)."""
    out = _outcomes(L, num_classes)
    counts = np.zeros((len(out), num_classes + 1))
    np.add.at(counts, (np.repeat(np.arange(len(out)), out.shape[1]), out.ravel()), 1)
    counts = counts[:, :num_classes]
    top = counts.max(axis=1, keepdims=True)
    winners = (counts == top) & (top > 0)
    winners[top[:, 0] == 0] = True  # no votes: uniform
    return winners / winners.sum(axis=1, keepdims=True)


def _accuracy_prior(out: np.ndarray, k: int, accuracy: float, strength: float) -> np.ndarray:
    """(m, K, K+1) pseudo-counts: function j votes l at its observed rate r_jl, for class l `accuracy` of the
    time (P(vote l | y = l) = K r_jl accuracy, P(vote l | y != l) = K r_jl (1 - accuracy) / (K - 1), the
    classes taken as balanced), and abstains with the rest; `strength` rows per class."""
    n, m = out.shape
    prior = np.zeros((m, k, k + 1))
    for j in range(m):
        rate = np.bincount(out[:, j], minlength=k + 1)[:k] / n  # (K,) how often it votes each class
        votes = np.tile(rate * k * (1 - accuracy) / max(k - 1, 1), (k, 1))  # (K classes, K votes)
        votes[np.diag_indices(k)] = rate * k * accuracy
        votes *= np.minimum(1.0, 0.99 / np.maximum(votes.sum(axis=1, keepdims=True), 1e-12))  # a row sums to < 1
        prior[j, :, :k], prior[j, :, k] = votes, 1 - votes.sum(axis=1)
    return prior * strength


def fit_dawid_skene(L: np.ndarray, num_classes: int, class_balance: np.ndarray | None = None, max_iter: int = 500,
                    tol: float = 1e-7, smoothing: float = 0.1, prior_accuracy: float = 0.7,
                    prior_strength: float = 10.0) -> DawidSkene:
    """Fit Dawid–Skene by EM on a label matrix; no gold labels. `class_balance` fixes P(y) instead of
    estimating it. Stops when the average log-likelihood per row changes by less than `tol`."""
    k = num_classes
    out = _outcomes(L, k)
    n, m = out.shape
    if n == 0:
        raise ValueError("the label matrix has no rows")
    onehots = [np.eye(k + 1)[out[:, j]] for j in range(m)]  # per function (n, K+1)
    prior = _accuracy_prior(out, k, prior_accuracy, prior_strength) + smoothing
    q = majority_vote(L, k)  # initial posteriors: which class is which comes from here
    fixed = None if class_balance is None else np.asarray(class_balance, dtype=np.float64) / np.sum(class_balance)
    previous, converged, it, ll = -np.inf, False, 0, -np.inf
    for it in range(1, max_iter + 1):
        pi = fixed if fixed is not None else (q.sum(axis=0) + smoothing) / (n + k * smoothing)
        counts = np.stack([q.T @ oh for oh in onehots]) + prior  # (m, K, K+1)
        theta = counts / counts.sum(axis=2, keepdims=True)
        q, ll = _posterior(out, np.log(pi), np.log(theta))
        if abs(ll - previous) / n < tol:
            converged = True
            break
        previous = ll
    return DawidSkene(pi, theta, it, ll, converged)


def predict(probs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hard labels from (n, K) probabilities: the most likely class, ties broken at random (seeded)."""
    rng = np.random.default_rng(seed)
    best = probs >= probs.max(axis=1, keepdims=True) - 1e-12
    noise = rng.random(probs.shape)
    return np.where(best, noise, -1.0).argmax(axis=1)


def accuracy(probs: np.ndarray, gold: np.ndarray) -> float:
    """Accuracy of the most likely class, a tie counted as the chance of breaking it right (1/ties if gold is
    among the tied classes): majority vote ties often, and this scores it without a seed's luck."""
    if len(gold) == 0:
        return float("nan")
    best = probs >= probs.max(axis=1, keepdims=True) - 1e-12
    return float((best[np.arange(len(gold)), gold] / best.sum(axis=1)).mean())
