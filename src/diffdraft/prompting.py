"""Prompts in, token ids out, with every check a request needs before a model runs.

One validation path for the CLI, the Python API, the server and the bench: text must be
valid UTF-8 and not empty, chat messages need a known role and string content, and the
prompt plus the new tokens asked for must fit the model's context. Each problem is a
DiffdraftError whose message names the field at fault (`param`, for the server's error
JSON). Knows nothing of drafting, decoding or HTTP.
"""

from __future__ import annotations

from diffdraft.errors import DiffdraftError
from diffdraft.target import TargetBackend

ROLES = ("system", "user", "assistant")
SEED_LIMIT = 2**63  # seeds are torch.Generator seeds: integers in [0, 2**63)


class RequestError(DiffdraftError):
    """A bad value in a request; `param` names the field at fault (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_seed(seed: object) -> int:
    """A request's seed: an integer in [0, 2**63), as torch.Generator takes it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"seed must be an integer in [0, 2**63), got {seed!r}", "seed")
    return seed


def check_text(text: object, what: str = "the prompt", param: str | None = "prompt") -> str:
    """A prompt's text, refused when it is not a string, not valid UTF-8 or empty."""
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a string, got {type(text).__name__}", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: undecodable bytes from argv or stdin
        raise RequestError(f"{what} is not valid UTF-8 (an undecodable byte at character {err.start})", param) \
            from None
    return text


def check_messages(messages: object) -> list[dict]:
    """Chat messages [{"role", "content"}], refused unless each has a known role and text content
    and at least one holds more than white space."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               f"messages[{i}].role")
        check_text(message.get("content"), f"messages[{i}].content", f"messages[{i}].content")
    if not any(m["content"].strip() for m in messages):
        raise RequestError("the prompt is empty", "messages")
    return messages


def chat_ids(target: TargetBackend, prompt: str | list[dict]) -> list[int]:
    """Token ids for a user prompt (str) or a list of chat messages, through the chat template."""
    if isinstance(prompt, str):
        if not check_text(prompt).strip():
            raise RequestError("the prompt is empty", "prompt")
        prompt = [{"role": "user", "content": prompt}]
    return target.encode_chat(check_messages(prompt))


def text_ids(target: TargetBackend, text: str) -> list[int]:
    """Token ids of raw text (a completion prompt: no chat template), by the tokenizer's own rules."""
    if not check_text(text).strip():
        raise RequestError("the prompt is empty", "prompt")
    return target.encode_text(text)


def check_started(target: TargetBackend, prompt_tokens: int, max_new_tokens: object,
                  param: str = "max_new_tokens") -> int:
    """max_new_tokens, refused unless it is a positive integer and the prompt leaves room for a first
    new token. The engine asks no more: it stops by itself when the context fills."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise RequestError(f"{param} must be a positive integer, got {max_new_tokens!r}", param)
    if prompt_tokens >= target.max_context:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; the model context holds {target.max_context}",
                           "messages")
    return max_new_tokens


def check_fits(target: TargetBackend, prompt_tokens: int, max_new_tokens: object,
               param: str = "max_new_tokens") -> int:
    """max_new_tokens, refused unless check_started passes and the prompt plus that many tokens fit
    the model's context (what a request promises before it runs)."""
    check_started(target, prompt_tokens, max_new_tokens, param)
    context = target.max_context
    room = context - prompt_tokens
    if max_new_tokens > room:
        raise RequestError(
            f"{param} {max_new_tokens} does not fit: the prompt has {prompt_tokens} tokens and the model context "
            f"holds {context}, so at most {room} new tokens", param)
    return max_new_tokens
