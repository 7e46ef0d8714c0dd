"""`hmoe chat` driven through a real pseudo-terminal: streaming, slash commands, Ctrl-C / Ctrl-D."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect

from tests.serving.conftest import API_KEY

HMOE = str(Path(sys.executable).with_name("hmoe"))


def _spawn(server: str):
    env = {**os.environ, "HMOE_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(HMOE, ["chat", "--url", server], env=env, encoding="utf-8", timeout=90)


def test_chat_streams_and_obeys_commands(server):
    child = _spawn(server)
    child.expect("experts: math, reasoning, conversation, knowledge, code")
    child.expect("> ")
    child.sendline("/expert code")
    child.expect("expert: code")
    child.sendline("/temp 0")
    child.expect("temperature: 0.0")
    child.sendline("/max 12")
    child.expect("max tokens: 12")
    child.sendline("def add(a, b):")
    child.expect(r"\[code \| group technical \| explicit \|")  # the expert that answered
    child.sendline("/expert nobody")
    child.expect("unknown expert 'nobody'")
    child.sendline("/mode ensemble")
    child.expect("mode: ensemble")
    child.sendline("/expert auto")
    child.sendline("Tell me about Peru.")
    child.expect(r"\[\w+( \+ \w+)? \| group \w+ \|")
    child.sendeof()  # Ctrl-D quits
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_quits_on_ctrl_c(server):
    child = _spawn(server)
    child.expect("> ")
    child.sendintr()
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_says_when_no_server(tmp_path):
    child = pexpect.spawn(HMOE, ["chat", "--url", "http://127.0.0.1:9"], encoding="utf-8", timeout=60)
    child.expect("cannot reach an hmoe server")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
