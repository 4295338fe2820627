"""What a question gets back: the Answer, and the Deltas of a streamed one. No torch here: the thin client
(`--server`) builds the same objects from the server's JSON."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability and the `top` most likely tokens' [(token id, logprob), ...], most
    likely first. Values are log_softmax of the logits after every logits processor (penalties, biases, the
    model's generation-config rules, a grammar's mask) and the temperature, before the sampling filters
    (top-k, top-p, min-p, typical, epsilon, eta); a greedy row's temperature is 1 (decode.sampling)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "top": [list(pair) for pair in self.top]}


@dataclass
class Answer:
    text: str
    token_ids: list[int]  # generated ids, an end-of-turn token included when the model produced one
    prompt_tokens: int  # all tokens before the answer: cached + newly computed
    cached_tokens: int  # tokens taken from the state instead of being computed
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: ttft_s, decode_s, total_s; tokens_per_s
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids when asked for (logprobs=N)

    def to_dict(self) -> dict:
        extra = {"logprobs": [lp.to_dict() for lp in self.logprobs]} if self.logprobs is not None else {}
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings,
            **extra,
        }


@dataclass
class Delta:
    """One streamed step: new text (may be empty while a character is incomplete) and its token id."""

    text: str
    token_id: int
    answer: Answer | None = None  # set on the last delta only
    logprobs: TokenLogprobs | None = None  # the token's, when asked for
