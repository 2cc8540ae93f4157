"""Group relative policy optimisation (GRPO), online: the model samples a group of completions for each
prompt, reward functions (or a trained reward model) score them, and each completion's advantage is its
reward relative to its group's:  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4).

Per completion token t, with the ratio rho_t = pi(token) / pi_old(token) (one update per sampled batch, so
pi_old is the current policy detached: rho = 1 with the policy gradient's derivative) and the k3 estimate of
KL(pi || ref) = exp(ref - logp) - (ref - logp) - 1:

  loss_t = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon) A) + beta KL_t

averaged over the completion's tokens (through its first EOS: prompts and padding carry no loss), summed over
completions and counted in completions (prompts x num_generations), so gradient accumulation is exact. The
reference is the model with its adapters disabled (LoRA), or a frozen copy (full fine-tuning); beta 0 needs
none. While training, each completion draws from its own generator seeded from the run's RNG (so a resumed
run samples the same); evaluation seeds it from the prompt, so every evaluation of a prompt uses the same
random numbers and before / after rewards differ only by the model.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError
from .base import Objective
from .logprobs import Reference, completion_logps, frozen_copy, has_adapters, resolve_reference


def load_graders(paths: list[str]) -> list:
    """OpenAI grader objects from JSON files, as reward functions (a file you give runs as you wrote it, python
    graders included; the service checks its users' graders before they get here)."""
    import json
    from pathlib import Path

    from ..graders import GraderError, grader_reward
    funcs = []
    for path in paths:
        try:
            spec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"objective.graders: {path}: cannot read a grader object ({e})") from None
        try:
            funcs.append(grader_reward(spec, allow_python=True))
        except GraderError as e:
            raise ConfigError(f"objective.graders: {path}: {e}") from None
    return funcs


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of consecutive groups of `group` completions -> (N,) advantages, zero-mean per group."""
    r = rewards.view(-1, group)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)).reshape(-1)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from sampled tokens: exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-completion clipped-ratio loss (+ beta x KL), averaged over its completion tokens: (N,).
    logps, old_logps, ref_logps, mask (N, L); advantages (N,)."""
    # masked positions (after EOS, padding) are zeroed before any exp: their KL term could overflow to inf, and
    # inf * 0 (or the gradient of an unselected torch.where branch) is NaN
    keep = mask.bool()
    logps, old_logps = torch.where(keep, logps, 0), torch.where(keep, old_logps, 0)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)  # (N, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    if beta and ref_logps is not None:
        per_token = per_token + beta * kl_k3(logps, torch.where(keep, ref_logps, 0))
    return torch.where(keep, per_token, 0).sum(-1) / keep.sum(-1).clamp(min=1)


def _cache(out):
    """The KV cache a forward pass returned (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    return out.cache if "cache" in out else out.past_key_values


@torch.no_grad()
def sample_completions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                       temperature: float, seeds: list[int], eos_ids: list[int], pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (N, P) -> completions (N, L) and their mask (N, L): every token up to and including
    the first EOS. Row i samples with its own generator seeded by seeds[i]; temperature 0 is greedy."""
    n, device = input_ids.shape[0], input_ids.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(eos_ids or [-1], device=device)
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the prompt's last logits only
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    past, logits, next_pos = _cache(out), out.logits[:, -1], pos[:, -1:] + 1
    tokens, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if temperature > 0:  # inverse-CDF sampling: one uniform per row, from that row's generator
            cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)  # (N, V)
            u = torch.cat([torch.rand(1, generator=gens[i], device=device, dtype=torch.float64) for i in range(n)])
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # later tokens never change earlier ones
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_arg: past})
        past, logits, next_pos = _cache(out), out.logits[:, -1], next_pos + 1
    completions = torch.stack(tokens, dim=1)  # (N, L)
    is_eos = torch.isin(completions, eos).long()
    return completions, (is_eos.cumsum(1) - is_eos) == 0  # after the first EOS: masked


def stop_tokens(model, tok) -> list[int]:
    """Where a completion ends: the tokenizer's EOS (a chat model's end of turn) and the model's own EOS ids."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [found] if isinstance(found, int) else list(found or [])
    return sorted({*ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})


@dataclass
class Rollout:
    """One forward pass of GRPO: sampled completions, their log-probs, rewards and advantages."""
    logps: torch.Tensor  # (N, L) policy log-probs of the completion tokens (with gradients while training)
    ref_logps: torch.Tensor | None  # (N, L) the reference's, or None (beta 0 / no reference)
    mask: torch.Tensor  # (N, L) completion tokens, through the first EOS
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,) weighted sum of the sources
    sources: torch.Tensor  # (N, K) each reward source
    group: int

    def detach(self) -> "Rollout":
        return replace(self, logps=self.logps.detach())

    def float(self) -> "Rollout":
        return replace(self, logps=self.logps.float(),
                       ref_logps=None if self.ref_logps is None else self.ref_logps.float())

    def kl(self) -> torch.Tensor | None:
        """(N,) mean per-token KL of each completion to the reference."""
        if self.ref_logps is None:
            return None
        keep = self.mask.bool()  # masked positions zeroed first: their exp could overflow (see grpo_loss)
        kl = kl_k3(torch.where(keep, self.logps.detach().float(), 0), torch.where(keep, self.ref_logps.float(), 0))
        return kl.sum(-1) / keep.sum(-1).clamp(min=1)


@dataclass
class GRPO(Objective):
    name = "grpo"
    task = "causal_lm"
    formats = ("prompt_only",)
    default_for = ("prompt_only",)
    data_format = "prompt_only"  # `messages` rows are prompts here, not chat to imitate
    headline = "reward"
    higher_is_better = True

    beta: float = 0.1
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    epsilon: float = 0.2
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_model: str | None = None
    reference: str = "auto"
    graders: list[str] = field(default_factory=list)  # OpenAI grader JSON files (tunesmith.graders)

    def __post_init__(self) -> None:
        if not self.reward_funcs and not self.reward_model and not self.graders:
            raise ConfigError("objective.reward_funcs: grpo needs a reward: Python functions (reward_funcs: "
                              "[module:function]) or a reward-model run (reward_model: RUN_DIR). (A file of rows "
                              "with a prompt and no completion is read as prompts for grpo; for supervised "
                              "fine-tuning give each row a completion.)")
        if self.reference == "precomputed":
            raise ConfigError("objective.reference=precomputed: grpo samples new completions every step, so their "
                              "reference log-probs cannot be computed ahead; use auto, adapters_disabled or copy")
        if self.num_generations < 2:
            raise ConfigError("objective.num_generations: must be at least 2")
        sources = len(self.reward_funcs) + len(self.graders) + (self.reward_model is not None)
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ConfigError(f"objective.reward_weights: one weight per reward source ({sources}), or null")
        self._funcs, self._tok, self._reference = None, None, Reference()

    @classmethod
    def create(cls, cfg, data) -> "GRPO":
        from ..rewards import load_reward_funcs
        load_reward_funcs(cfg.reward_funcs or [])  # a missing or broken function fails before a run folder exists
        graders = list(getattr(cfg, "graders", None) or [])
        load_graders(graders)
        return cls(cfg.beta, cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.epsilon,
                   list(cfg.reward_funcs or []), cfg.reward_weights, cfg.reward_model, cfg.reference, graders)

    def attach(self, model, tokenizer, data, run_dir, cfg, log=print) -> None:
        self._tok = tokenizer
        self._load_rewards(model)  # a reward model that does not load fails now, not after the first sampling
        if self.beta > 0 and resolve_reference(self.reference, model) == "copy":
            self._reference = Reference(frozen_copy(model))

    def _load_rewards(self, model) -> list:
        if self._funcs is None:
            from ..devices import model_device
            from ..rewards import load_reward_funcs, reward_model_func
            funcs = load_reward_funcs(self.reward_funcs) + load_graders(self.graders)
            if self.reward_model:
                funcs.append(reward_model_func(self.reward_model, model_device(model)))
            self._funcs = funcs
        return self._funcs

    def _tokenizer(self, model):
        if self._tok is None:  # a finished run's objective (tunesmith eval): the tokenizer of the model it loaded
            from ..models import load_tokenizer
            self._tok = load_tokenizer(model.name_or_path)
        return self._tok

    def _seeds(self, model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        g = self.num_generations
        if model.training:  # drawn from the run's RNG, which checkpoints store
            return [int(torch.randint(0, 2**62, (1,))) for _ in range(prompt_ids.shape[0] * g)]
        seeds = []
        for row, m in zip(prompt_ids.tolist(), attention_mask.tolist()):
            key = str([t for t, keep in zip(row, m) if keep]).encode()
            seeds += [int.from_bytes(hashlib.sha256(key + bytes([k])).digest()[:7], "big") for k in range(g)]
        return seeds

    def forward(self, model, batch: dict) -> Rollout:
        tok, g = self._tokenizer(model), self.num_generations
        ids = batch["input_ids"].repeat_interleave(g, 0)  # (B*G, P): each prompt G times, groups consecutive
        mask = batch["attention_mask"].repeat_interleave(g, 0)
        eos = stop_tokens(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        was_training = model.training
        model.eval()  # sampling: no dropout
        completions, comp_mask = sample_completions(model, ids, mask, self.max_completion_length, self.temperature,
                                                    self._seeds(model, batch["input_ids"], batch["attention_mask"]),
                                                    eos, pad)
        model.train(was_training)
        from ..data.preference import prompt_text
        from ..rewards import compute_rewards
        texts = [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(completions, comp_mask)]
        prompts = [p for p in batch["prompt"] for _ in range(g)]
        fields = [{**f, **({"messages": p} if isinstance(p, list) else {})} for p, f in zip(batch["prompt"],
                                                                                          batch["fields"]) for _ in range(g)]
        sources = compute_rewards(self._load_rewards(model), [prompt_text(p) for p in prompts], texts, fields)
        weights = torch.tensor(self.reward_weights or [1.0] * sources.shape[1])
        rewards = (sources * weights).sum(-1)
        full_ids = torch.cat([ids, completions], dim=1)  # (N, P + L)
        full_mask = torch.cat([mask, comp_mask.long()], dim=1)
        length = completions.shape[1]
        logps = completion_logps(model, full_ids, full_mask, length)  # (N, L), with gradients
        ref = None
        if self.beta > 0 and (self._reference.model is not None or has_adapters(model)):
            ref = self._reference.run(model, completion_logps, full_ids, full_mask, length)
        device = logps.device
        return Rollout(logps, ref, comp_mask, group_advantages(rewards, g).to(device), rewards.to(device),
                       sources.to(device), g)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] * self.num_generations  # completions

    def loss(self, out: Rollout, batch: dict) -> tuple[torch.Tensor, int]:
        per_seq = grpo_loss(out.logps.float(), out.logps.detach().float(), out.advantages, out.mask, self.epsilon,
                            self.beta, None if out.ref_logps is None else out.ref_logps.float())
        return per_seq.sum(), per_seq.shape[0]

    def step_metrics(self, out: Rollout, batch: dict) -> dict[str, tuple[float, int]]:
        n, groups = out.rewards.shape[0], out.rewards.view(-1, out.group)
        metrics = {"reward": (float(out.rewards.sum()), n), "reward_std": (float(groups.std(-1).sum()), groups.shape[0]),
                   "completion_length": (float(out.mask.sum()), n)}
        kl = out.kl()
        if kl is not None:
            metrics["kl"] = (float(kl.sum()), n)
        for name, values in self._per_source(out).items():
            metrics[name] = (sum(values), n)
        return metrics

    def _per_source(self, out: Rollout) -> dict[str, list[float]]:
        """Each reward source's scores, with several sources: a sum can rise while the part that matters falls
        (a format reward hacked while correctness drops), so each is reported on its own."""
        if out.sources.shape[1] < 2:
            return {}
        from ..rewards import reward_name
        return {f"reward_{reward_name(f, k)}": out.sources[:, k].tolist() for k, f in enumerate(self._funcs or [])}

    def collect(self, out: Rollout, batch: dict) -> dict[str, list]:
        kl = out.kl()
        return {"reward": out.rewards.tolist(), "length": out.mask.sum(-1).tolist(), **self._per_source(out),
                "group_std": out.rewards.view(-1, out.group).std(-1).tolist(), **({"kl": kl.tolist()} if kl is not None else {})}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        n = max(len(collected.get("reward", [])), 1)
        out = {"eval_loss": loss_sum / max(count, 1), "eval_reward": sum(collected.get("reward", [])) / n,
               "eval_reward_std": sum(collected.get("group_std", [])) / max(len(collected.get("group_std", [])), 1),
               "eval_completion_length": sum(collected.get("length", [])) / n}
        if collected.get("kl"):
            out["eval_kl"] = sum(collected["kl"]) / n
        for key, values in collected.items():  # eval_reward_correct, ...: each source's held-out mean
            if key.startswith("reward_") and key != "reward_std":
                out[f"eval_{key}"] = sum(values) / n
        return out


OBJECTIVE = GRPO
