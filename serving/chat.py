"""``hmoe chat``: a terminal chat against a running hmoe server, streaming token by token.

Commands: ``/expert NAME`` (or ``auto``), ``/mode top1|ensemble``, ``/temp 0.7``,
``/max 128``, ``/help``, ``/quit``. Ctrl-C while an answer streams stops that answer;
Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

HELP = ("commands: /expert NAME|auto  /mode top1|ensemble  /temp T|default  /max N  /help  /quit\n"
        "Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt quits.")


@dataclass
class ChatState:
    """What the next request is sent with; changed by slash commands."""

    expert: str = "auto"
    mode: str = "top1"
    temperature: float | None = None  # None: the answering expert's default (greedy for math)
    max_tokens: int = 128
    experts: list[str] = field(default_factory=list)

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "stream": True, "mode": self.mode, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.expert != "auto":
            body["expert"] = self.expert
        return body


def apply_command(state: ChatState, line: str) -> str:
    """Apply one slash command to ``state`` and return what to tell the user."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    if name == "help":
        return HELP
    if name == "expert":
        if arg != "auto" and state.experts and arg not in state.experts:
            return f"unknown expert {arg!r}; choose auto or one of {', '.join(state.experts)}"
        state.expert = arg or "auto"
        return f"expert: {state.expert}"
    if name == "mode":
        if arg not in ("top1", "ensemble"):
            return "mode must be top1 or ensemble"
        state.mode = arg
        return f"mode: {arg}"
    if name == "temp" and arg == "default":
        state.temperature = None
        return "temperature: the expert's default"
    if name in ("temp", "max"):
        try:
            value = float(arg) if name == "temp" else int(arg)
        except ValueError:
            return f"/{name} needs a number, e.g. /{name} {'0.7' if name == 'temp' else '128'}"
        if value < 0 or (name == "max" and value < 1):
            return f"/{name} must be {'>= 0' if name == 'temp' else '>= 1'}"
        if name == "temp":
            state.temperature = value
        else:
            state.max_tokens = int(value)
        return f"{'temperature' if name == 'temp' else 'max tokens'}: {value}"
    return f"unknown command /{name}; {HELP}"


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent-event stream, up to ``[DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def describe(routing: dict[str, Any]) -> str:
    """One line saying who answered and how sure the router was."""
    probs = routing.get("expert_probs") or {}
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(probs.items(), key=lambda kv: -kv[1])[:3])
    who = " + ".join(routing.get("experts") or [routing.get("expert", "?")])
    return f"[{who} | group {routing.get('group') or 'all domains'} | {routing.get('mode', '?')} | {top}]"


def ask(client: httpx.Client, state: ChatState, prompt: str, out: TextIO) -> None:
    """Send one prompt and stream the answer to ``out``."""
    with client.stream("POST", "/generate", json=state.body(prompt)) as r:
        if r.status_code != 200:
            r.read()
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text
            out.write(f"error {r.status_code}: {msg}\n")
            return
        routing = None
        for ev in sse_events(r):
            if "error" in ev:
                out.write(f"\nerror: {ev['error'].get('message')}\n")
                return
            out.write(ev.get("text", ""))
            out.flush()
            routing = ev.get("routing") or routing
        out.write("\n" + (describe(routing) if routing else "") + "\n")


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(120.0, connect=5.0))


def run_chat(url: str, *, api_key: str | None = None, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """The interactive loop; returns the process exit code."""
    state = ChatState()
    with _client(url, api_key) as client:
        try:
            models = client.get("/v1/models").json()["data"]
            state.experts = [m["id"] for m in models if m["id"] != "auto"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            out.write(f"cannot reach an hmoe server at {url} ({e}); start one with `hmoe serve RUN_DIR`\n")
            return 1
        out.write(f"hmoe chat at {url}; experts: {', '.join(state.experts)}\n{HELP}\n")
        while True:
            try:
                out.write("> ")
                out.flush()
                line = inp.readline()
            except KeyboardInterrupt:
                out.write("\nbye\n")
                return 0
            if not line:  # Ctrl-D
                out.write("\nbye\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                out.write("bye\n")
                return 0
            if line.startswith("/"):
                out.write(apply_command(state, line) + "\n")
                continue
            try:
                ask(client, state, line, out)
            except KeyboardInterrupt:
                out.write("\n[stopped]\n")
            except httpx.HTTPError as e:
                out.write(f"\nrequest failed: {e}\n")


def chat_main(args: Any) -> int:
    """Entry point of ``hmoe chat``."""
    # Ctrl-C quits even when the shell that started us ignored SIGINT (a background job of a
    # script hands SIG_IGN down, and Python then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    api_key = getattr(args, "api_key", None) or os.environ.get("HMOE_API_KEY")
    return run_chat(args.url, api_key=api_key)
