"""Fitting a chat request into the model's context window: how many tokens the answer
may have (:func:`max_tokens`: what the caller asked, within the tenant's output cap) and
the prompt trimmed to the room left (:func:`fit`: oldest history first, then the
lowest-ranked passages); vLLM refuses a prompt over the window (it never truncates one)
and an exact count costs a ``/tokenize`` call through a generation slot, so the fit
starts from a local upper bound and asks the server at most once.
"""

from __future__ import annotations

import math

from app.db.models import Tenant
from app.domain.chat.answer import Plan
from app.domain.chat.prompt import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    PromptParts,
    build_messages,
    defuse,
    token_upper_bound,
)
from app.domain.chat.schemas import ChatCompletionRequest
from app.errors import ContextLengthError
from app.inference.dispatcher import Dispatcher
from app.quotas.policy import output_cap
from app.settings import LlmSettings

# Trimming scales one exact count by bytes: this much spare for text denser than the
# prompt's average (vLLM refuses a prompt over the window; it never truncates one).
FIT_HEADROOM = 0.1


def max_tokens(llm: LlmSettings, tenant: Tenant, req: ChatCompletionRequest) -> int:
    """The answer's token limit: the caller's, else the default, within the tenant's
    output cap."""
    asked = req.max_completion_tokens or req.max_tokens or llm.default_max_tokens
    cap = output_cap(tenant)
    return min(asked, cap) if cap is not None else asked


async def fit(dispatcher: Dispatcher, plan: Plan, model: str, parts: PromptParts,
              ) -> tuple[list[dict[str, str]], int, int, bool]:
    """The messages, trimmed to fit the context window with room for the answer:
    oldest history first, then the lowest-ranked passages. Returns them with the
    prompt's token count, how many passages they kept, and whether the count is
    exact. At most one ``/tokenize`` call (through a generation slot): when the whole
    prompt is over, what to drop is found locally, from its exact count scaled by
    each part's bytes (with ``FIT_HEADROOM`` to spare)."""
    everything = len(parts.passages or [])
    budget = plan.window - plan.max_tokens
    messages = build_messages(parts)
    bound = token_upper_bound(messages)
    if bound <= budget:
        return messages, bound, everything, False
    count = await dispatcher.count_prompt_tokens(
        plan.route, model, messages, cost=bound + plan.max_tokens)
    if count <= budget:
        return messages, count, everything, True
    density = count / bound * (1 + FIT_HEADROOM)  # tokens per byte of this prompt
    # Dropping the oldest history messages takes their bytes off the bound.
    dropped = 0
    for history_from, m in enumerate(parts.history, start=1):
        dropped += len(defuse(m["content"]).encode()) + TEMPLATE_TOKENS_PER_MESSAGE
        if math.ceil((bound - dropped) * density) <= budget:
            candidate = build_messages(parts, history_from=history_from)
            return candidate, math.ceil((bound - dropped) * density), everything, False
    for keep in range(everything - 1, -1, -1):
        candidate = build_messages(parts, history_from=len(parts.history), passages=keep)
        estimate = math.ceil(token_upper_bound(candidate) * density)
        if estimate <= budget:
            return candidate, estimate, keep, False
    bare = build_messages(parts, history_from=len(parts.history), passages=0)
    n = count if not parts.history and not everything \
        else math.ceil(token_upper_bound(bare) * count / bound)
    raise ContextLengthError(
        f"the message is too long: about {n} prompt tokens even without history or "
        f"passages; the model's context window is {plan.window} tokens and max_tokens "
        f"is {plan.max_tokens}", context_window=plan.window)
