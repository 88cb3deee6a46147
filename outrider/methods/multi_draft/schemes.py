"""How several drafts of one position are drawn from the draft's distribution q, and the verifier that keeps the
target's distribution exact for each ("Towards Optimal Multi-Draft Speculative Decoding", Hu et al., ICLR 2025):

- with replacement: n i.i.d. draws from q, verified by recursive rejection sampling (RRS) with q fixed;
- without replacement: the n largest of log q + Gumbel noise (the same law as n draws without replacement, in
  that order), verified by RRS that removes each rejected draft from q;
- greedy: q's n − 1 most probable tokens, always, and one draw from q restricted to the rest, verified by the
  paper's greedy-draft verifier, which reaches this scheme's optimal acceptance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from outrider.scheduler.verify import SiblingRule, greedy_draft_rule, rrs_with_replacement, rrs_without_replacement

SamplingName = Literal["with-replacement", "without-replacement", "greedy"]
VerifierName = Literal["rrs", "rrs-without-replacement", "greedy-draft"]


def draw_with_replacement(q: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """[n] i.i.d. draws from q [V] (repeats allowed)."""
    return torch.multinomial(q, n, replacement=True, generator=generator)


def draw_without_replacement(q: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """[min(n, |supp q|)] distinct tokens by Gumbel-top-k: the order of the keys log q(x) + G_x, G_x ~ Gumbel(0, 1),
    is the order of sequential draws without replacement (Kool et al. 2019)."""
    n = min(n, int((q > 0).sum()))
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=q.device).clamp_min(1e-300)
    keys = torch.log(q.double()) - torch.log(-torch.log(u))  # -inf where q = 0
    return torch.topk(keys, n).indices


def draw_greedy(q: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """[min(n, |supp q|)]: q's n − 1 most probable tokens, then one draw from q with them removed."""
    n = min(n, int((q > 0).sum()))
    top = torch.topk(q, n - 1).indices
    rest = q.scatter(0, top, 0.0)
    return torch.cat([top, torch.multinomial(rest / rest.sum(), 1, generator=generator)])


@dataclass(frozen=True)
class Scheme:
    draw: Callable[[Tensor, int, torch.Generator | None], Tensor]  # (q [V], n, generator) -> drafted columns
    verifier: VerifierName  # the verifier that is lossless for these draws


SCHEMES: dict[str, Scheme] = {
    "with-replacement": Scheme(draw_with_replacement, "rrs"),
    "without-replacement": Scheme(draw_without_replacement, "rrs-without-replacement"),
    "greedy": Scheme(draw_greedy, "greedy-draft"),
}

VERIFIERS: dict[str, SiblingRule] = {
    "rrs": rrs_with_replacement,
    "rrs-without-replacement": rrs_without_replacement,
    "greedy-draft": greedy_draft_rule,
}
