"""`moegpt serve` as a real process on a loopback port, driven by the official `openai`
client and by raw HTTP: the OpenAI endpoints, streaming, bad requests (each a 4xx, the server
still serving), 200 concurrent batch-invariant streams, disconnects freeing their blocks, API
keys, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.test_token_bytes import valid_utf8

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moegpt.cli", "serve", str(model)]
        command += ["--port", str(self.port), "--served-model-name", MODEL, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        pairs = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        return {name: float(value) for name, value in pairs}

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["moegpt_requests_running"] == 0 and m["moegpt_requests_waiting"] == 0
            if (idle and m["moegpt_kv_blocks_used"] == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status
# says how the process ended.
STOPPED = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def server(text_model: Path) -> Iterator[Server]:
    s = Server(text_model, "--max-batch-size", "256", "--num-kv-blocks", "2048")
    yield s
    assert s.stop() in STOPPED


@pytest.fixture()
def client(server: Server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_completions_and_streaming(client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    done = client.completions.create(
        model=MODEL, prompt="def forward(self, x):", max_tokens=12, temperature=0, logprobs=2
    )
    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 12
    assert len(choice.logprobs.token_logprobs) == 12
    # keyed by token text: two tokens with the same text (partial UTF-8) share a key
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
    pieces = client.completions.create(
        model=MODEL, prompt="def forward(self, x):", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == choice.text


def test_logprobs_offsets_and_bytes_hold_however_the_text_is_sent(client) -> None:
    """Streamed completions give each token the ``text_offset`` the whole response does (text
    held back for an incomplete character does not shift it), and chat's ``bytes`` are each
    token's own, so they concatenate to the reply's UTF-8 even where a token holds part of a
    character (the untrained model writes many)."""
    ask = {"model": MODEL, "prompt": "x = '", "max_tokens": 40, "temperature": 1.0, "seed": 3}
    whole = client.completions.create(**ask, logprobs=1).choices[0].logprobs
    chunks = [
        c.choices[0].logprobs for c in client.completions.create(**ask, logprobs=1, stream=True)
    ]
    assert [o for c in chunks if c for o in c.text_offset] == whole.text_offset
    assert [t for c in chunks if c for t in c.tokens] == whole.tokens
    assert whole.text_offset[1] == len(whole.tokens[0])
    messages = [{"role": "user", "content": "x = '"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=1.0, seed=3, logprobs=True
    ).choices[0]
    raw = [bytes(entry.bytes) for entry in reply.logprobs.content]
    assert not all(map(valid_utf8, raw))  # some token holds part of a character
    assert b"".join(raw).decode(errors="replace") == reply.message.content


def test_chat_n_samples_and_stops(client) -> None:
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "import torch"},
    ]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    text = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant" and text
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    many = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=1.0, n=3, seed=5
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=1.0, n=3, seed=5
    )
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stop=[stop]
        )
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


BAD = [
    ("malformed JSON", b"{not json", 400, None),
    ("wrong type", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("unknown model", {"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ("prompt too long", {"model": MODEL, "prompt": "x = 1\n" * 200}, 400, "prompt"),
    ("max_tokens 0", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("n 0", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("n 1000", {"model": MODEL, "prompt": "x", "n": 1000}, 400, "n"),
    ("no prompt", {"model": MODEL}, 400, "prompt"),
    ("token out of range", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt"),
    ("seed too large", {"model": MODEL, "prompt": "x", "seed": 2**64, "stream": True}, 400, "seed"),
    ("empty stop", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server: Server, body, status: int, param: str | None
) -> None:
    url = f"{server.url}/v1/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    ok = httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_bad_chat_requests(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    for body, param in [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 0,
            },
            "max_completion_tokens",
        ),
    ]:
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param


PROMPTS = [f"def f{i}(x):\n    return x * {i}" for i in range(50)]


def test_200_concurrent_streams_are_batch_invariant(server: Server, client) -> None:
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(*(one(PROMPTS[i % 50]) for i in range(200)))
        finally:
            await aclient.close()

    texts = asyncio.run(together())
    assert texts == [alone[i % 50] for i in range(200)]
    metrics = server.wait_idle()
    assert metrics["moegpt_kv_blocks_used"] == 0


def test_disconnecting_clients_free_their_blocks(server: Server) -> None:
    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:

            async def one(i: int) -> tuple[int, int]:
                """Data lines received, and the tokens the server generated for us."""
                body = {"model": MODEL, "prompt": PROMPTS[i % 50], "max_tokens": 60}
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    lines, tokens = 0, 0
                    async for line in r.aiter_lines():
                        lines += line.startswith("data:")
                        if line.startswith("data: {") and '"usage"' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        if i % 2 and lines == 2:
                            break  # hang up mid-stream
                    return lines, tokens

            return await asyncio.gather(*(one(i) for i in range(200)))

    before = server.metrics()["moegpt_generation_tokens_total"]
    results = asyncio.run(run())
    lines = [n for n, _ in results]
    assert all(n == 2 for n in lines[1::2]) and all(n > 2 for n in lines[0::2])
    metrics = server.wait_idle()
    assert metrics["moegpt_kv_blocks_used"] == 0 and metrics["moegpt_requests_running"] == 0
    # the 100 that stayed got all their tokens; the 100 that left were cut off early (up to
    # 60 tokens each otherwise)
    stayed = sum(tokens for _, tokens in results[0::2])
    generated = metrics["moegpt_generation_tokens_total"] - before
    assert stayed <= generated < stayed + 100 * 20


def test_api_key_and_graceful_sigterm(text_model: Path) -> None:
    server = Server(text_model, "--api-key", "sesame")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        url = f"{server.url}/v1/completions"
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/health").status_code == 200
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        # SIGTERM while a request streams: it finishes and the server exits
        with httpx.stream(
            "POST",
            url,
            json={**body, "max_tokens": 100, "stream": True},
            headers={"authorization": "Bearer sesame"},
            timeout=60,
        ) as r:
            lines = r.iter_lines()
            next(lines)
            server.process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) in STOPPED
