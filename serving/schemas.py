"""HTTP request and response schemas: pydantic families with bounds on every field.

Static bounds live here (422 on violation, naming the field); bounds that depend on the loaded
models (prompt length within the context, ``max_tokens`` within the configured cap, token ids
within the vocabulary) are checked by the ingress and answered with 400 naming the field.
OpenAI request models ignore unknown fields (clients send many optional ones); the native
``/generate`` request forbids them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**63 - 1
MAX_PROMPTS = 64
MAX_STOP = 4
MAX_TEXT_CHARS = 200_000

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=1_000_000)]
StopText = Annotated[str, Field(min_length=1, max_length=64)]
Mode = Literal["top1", "ensemble", "auto"]


# fields that, when a request leaves them out, take the answering model's defaults (a math expert
# is greedy: router.domains.generation_defaults), else the defaults below
DEFAULTABLE = frozenset({"temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
                         "presence_penalty"})


class SamplingFields(BaseModel):
    """Sampling fields shared by every generation request."""

    max_tokens: int | None = Field(None, ge=0, description="None: 16 (completions) or the cap (chat)")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 is greedy; left out: the model's "
                               "default (0 for math, reasoning, knowledge and code experts), else 1")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers an id's logit by "
                                     "this times its count in the reply so far; left out: the model's default")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers the logit of an id "
                                    "that the reply already holds")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stop: StopText | list[StopText] | None = Field(None)
    mode: Mode = Field("top1", description="top1: one expert; ensemble: mix the router's top-k; "
                                           "auto: ensemble only when the router is unsure")
    ignore_eos: bool = Field(False, description="vLLM's field: keep generating past the end of the text "
                                                "(a chat turn still ends at its end marker); for benchmarks")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, le=1_000_000, description="keep only the last N prompt tokens (vLLM's field; <|bos|> "
        "stays first); -1: as many as fit with room to answer; None: a prompt over the context is refused")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(v)}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    include_usage: bool = False


# ---- OpenAI: /v1/completions ---------------------------------------------------------------
class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str = Field("auto", min_length=1, max_length=64)
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="a string, strings, token ids, or lists of token ids")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    n: int = Field(1, ge=1, le=1)
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("a token-id prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each a string or a list of token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class LogProbs(BaseModel):
    """OpenAI's legacy completions logprobs (what lm-evaluation-harness reads)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LogProbs | None = None
    finish_reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    hmoe: dict[str, Any] | None = None  # routing decision and timings


# ---- OpenAI: /v1/chat/completions ----------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: Text = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart] = ""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str = Field("auto", min_length=1, max_length=64)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1)
    stream_options: StreamOptions | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    hmoe: dict[str, Any] | None = None


# ---- native: /generate ---------------------------------------------------------------------
class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: Text
    truncate_prompt_tokens: int | None = Field(
        -1, ge=-1, le=1_000_000, description="-1 (the default): a long prompt is cut from the left to "
        "fit, and the response says truncated; N: keep the last N tokens; None: refuse it (400)")
    max_tokens: int | None = Field(64, ge=0)
    expert: str | None = Field(None, min_length=1, max_length=64,
                               description="an expert's name; None lets the router choose")
    chat: bool | None = Field(
        None, description="true: send the prompt as a chat user turn, <|user|>prompt<|end|><|assistant|>, "
        "whose answer ends at <|end|>; false: as text to continue; None: as a chat turn to each expert it "
        "is routed to that was instruction-tuned or trained on dialogues (conversation), as text to the others")
    stop: list[StopText] | None = None


class Routing(BaseModel):
    group: str | None  # None for a model outside the domain hierarchy (merged)
    expert: str
    experts: list[str]
    weights: list[float]
    group_probs: dict[str, float]
    expert_probs: dict[str, float]
    mode: str


class Timings(BaseModel):
    route_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    max_batch: int = 0  # largest decode batch this request took part in


class GenerateResponse(BaseModel):
    text: str
    routing: Routing
    prompt_tokens: int  # after truncation: the tokens the expert read
    truncated: bool = False
    completion_tokens: int
    finish_reason: str
    timings: Timings


# ---- listing -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hmoe"
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the tokenizer (vLLM-compatible: lm-evaluation-harness's tokenizer_backend=remote) ------------
class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=64)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: bool = Field(True, description="prompt: start with <|bos|>, as /v1/completions does")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's turn marker")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=64)
    tokens: list[TokenId] = Field(..., max_length=MAX_TEXT_CHARS)


class DetokenizeResponse(BaseModel):
    prompt: str
