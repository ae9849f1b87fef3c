"""Plain results of client calls, and the conversions from and to the proto messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.v1 import loraplex_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
}
ADAPTER_STATES = {
    pb.ADAPTER_STATE_UNSPECIFIED: "unspecified",
    pb.ADAPTER_STATE_REGISTERED: "registered",
    pb.ADAPTER_STATE_HOST: "host",
    pb.ADAPTER_STATE_DEVICE: "device",
    pb.ADAPTER_STATE_QUARANTINED: "quarantined",
}


@dataclass
class Completion:
    """A whole output (unary Generate), or one piece of a stream (`finish_reason` None until the last)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    """"length", "stop" or "eos"; None on stream pieces before the last."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Adapter:
    adapter_id: str
    source: str
    peft_type: str
    max_rank: int
    target_modules: list[str]
    num_virtual_tokens: int
    state: str
    """"registered" (disk only), "host" (host memory), "device" (a device slot) or "quarantined" (its
    requests failed repeatedly: refused until registered again)."""
    size_bytes: int
    pinned: bool
    quarantine_reason: str = ""


@dataclass
class ServerInfo:
    model: str
    architecture: str
    quantization: str
    dtype: str
    device: str
    max_context_tokens: int
    max_rank: int
    max_device_adapters: int
    max_host_adapters: int
    version: str
    kv_cache_tokens: int
    kv_cache_usage: float
    running_requests: int
    queued_requests: int
    max_queued_requests: int
    batch_invariant: bool = False
    """A request's tokens do not depend on what else shares its batches (see the proto)."""
    int8_threshold: float = 0.0
    prefix_caching: bool = False
    """The server keeps the KV of prompt prefixes for later requests of the same adapter."""
    prefix_cache_tokens: int = 0
    """Tokens of KV in the prefix cache now (reclaimable or shared by running requests)."""


def generate_request(
    prompt: str | None = None,
    *,
    adapter: str | None = None,
    prompt_token_ids: list[int] | None = None,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 0.0,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    ignore_eos: bool = False,
    return_logprobs: bool = False,
    request_id: str = "",
    cache_prompt: bool | None = None,
) -> pb.GenerateRequest:
    """The proto request; 0 for max_new_tokens, top_p and repetition_penalty means the server's default."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt and prompt_token_ids")
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty)
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(request_id=request_id, adapter_id=adapter or "", sampling=sampling,
                                 max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos,
                                 return_logprobs=return_logprobs)
    if cache_prompt is not None:
        request.cache_prompt = cache_prompt
    if prompt is not None:
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    return request


def completion(response: pb.GenerateResponse) -> Completion:
    return Completion(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        logprobs=list(response.logprobs),
        finish_reason=FINISH_REASONS.get(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
    )


def adapter(message: pb.Adapter) -> Adapter:
    return Adapter(
        adapter_id=message.adapter_id,
        source=message.source,
        peft_type=message.peft_type,
        max_rank=message.max_rank,
        target_modules=list(message.target_modules),
        num_virtual_tokens=message.num_virtual_tokens,
        state=ADAPTER_STATES.get(message.state, "unspecified"),
        size_bytes=message.size_bytes,
        pinned=message.pinned,
        quarantine_reason=message.quarantine_reason,
    )


def server_info(message: pb.ServerInfo) -> ServerInfo:
    return ServerInfo(**{name: getattr(message, name) for name in ServerInfo.__dataclass_fields__})
