"""OpenAI's Completions and Chat Completions wire format: request bodies in, response bodies out.

Request models accept what OpenAI's SDK and vLLM clients send (unknown fields are ignored, as vLLM
does); options that would change the result and that loraplex does not implement (n > 1, top
logprobs, penalties on presence/frequency, logit_bias, echo, suffix, tools, JSON modes) are refused
with a 400 naming the parameter rather than silently dropped. `to_sampling` maps the rest onto the
engine's `SamplingParams`, whose own checks give the same messages as the gRPC API.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from loraplex.server.engine.client import RequestOutput, SamplingParams
from loraplex.server.errors import InvalidArgument

MAX_PROMPTS = 64
"""Prompts in one completions request (each is a request in the engine, within --max-queued-requests)."""
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}
"""Engine finish reason -> OpenAI's (an EOS token and a stop string are both a natural stop)."""


class BadParameter(InvalidArgument):
    """An InvalidArgument that names the request field it is about (OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True
    """loraplex extension (as vLLM's extra body fields): false keeps this prompt out of the prefix cache."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadParameter("n", f"n must be 1 (one choice per request), got {self.n}; send separate requests "
                               "for several samples")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadParameter(name, f"{name} is not supported; use repetition_penalty (1 = off)")
        if self.logit_bias:
            raise BadParameter("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise BadParameter("stream_options", "stream_options is only allowed with stream: true")

    def sampling(self, max_new_tokens: int, logprobs: bool) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        top_k = self.top_k if self.top_k is not None else 0
        return SamplingParams(
            # OpenAI's default temperature is 1 (sampling); 0 is greedy
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            max_new_tokens=max_new_tokens,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
            return_logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and self.logprobs != 0:
            raise BadParameter("logprobs", f"logprobs must be 0 (the chosen token's logprob) or unset, got "
                               f"{self.logprobs}; top logprobs are not supported")
        if self.echo:
            raise BadParameter("echo", "echo is not supported")
        if self.suffix:
            raise BadParameter("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise BadParameter("best_of", f"best_of must be 1, got {self.best_of}")

    def prompts(self) -> list[tuple[str | None, tuple[int, ...] | None]]:
        """Each prompt as (text, None) or (None, token ids): a string, a list of token ids, or a list of either."""
        prompt = self.prompt
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = prompt if many else [prompt]
        if len(prompts) > MAX_PROMPTS:
            raise BadParameter("prompt", f"prompt holds {len(prompts)} prompts, more than {MAX_PROMPTS}")
        out = []
        for i, one in enumerate(prompts):
            if not one:
                raise BadParameter("prompt", f"prompt[{i}] is empty" if many else "the prompt is empty")
            out.append((one, None) if isinstance(one, str) else (None, tuple(one)))
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self, index: int) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadParameter(f"messages[{index}].content",
                                       f"messages[{index}] has a content part of type {part.get('type')!r}; only "
                                       "text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise BadParameter("messages", "messages is empty")
        if self.top_logprobs:
            raise BadParameter("top_logprobs", f"top_logprobs must be 0 or unset, got {self.top_logprobs}; top "
                               "logprobs are not supported")
        if self.tools:
            raise BadParameter("tools", "tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise BadParameter("response_format", f"response_format {self.response_format.get('type')!r} is not "
                               "supported; only 'text'")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------- responses
class Accumulated:
    """What a request produced so far: text, token ids and logprobs across the engine's deltas."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.last = RequestOutput("")

    def add(self, output: RequestOutput) -> None:
        self.text.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.last = output


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    """OpenAI's usage of a request, over the last outputs of its prompts."""
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(output: RequestOutput) -> str | None:
    return FINISH_REASONS.get(output.finish_reason) if output.finished else None


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int) -> dict[str, Any]:
    """Completions' logprobs object; `tokens` are the decoded text of each token."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
                        for token, logprob in zip(tokens, logprobs)]}


def completion_choice(index: int, text: str, output: RequestOutput, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(output)}


def completion_body(request_id: str, model: str, choices: list[dict[str, Any]],
                    outputs: list[RequestOutput]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(outputs)}


def chat_body(request_id: str, model: str, text: str, output: RequestOutput,
              logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason(output)}],
            "usage": usage([output])}


def completion_chunk(request_id: str, created: int, model: str, index: int, text: str, output: RequestOutput,
                     logprobs: dict[str, Any] | None, with_usage: bool) -> dict[str, Any]:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [completion_choice(index, text, output, logprobs)]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(request_id: str, created: int, model: str, delta: dict[str, Any], output: RequestOutput | None,
               logprobs: dict[str, Any] | None, with_usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs,
              "finish_reason": None if output is None else finish_reason(output)}
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(kind: str, request_id: str, created: int, model: str, outputs: list[RequestOutput]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the request's usage."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
            "usage": usage(outputs)}
