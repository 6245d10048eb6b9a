"""Reliability suite: what a serving user relies on, against a real server started with
``convgpt serve ENGINE DIR`` on a tiny checkpoint.

1. Bad requests: each one must get a 4xx naming the problem, and the server must go on
   answering (health and a good request) after it.
2. A burst of concurrent requests: every one must succeed, and each greedy output must
   equal the same prompt's output sent alone.
3. ``kill -9`` of the engine's server in the middle of a burst: the supervisor must exit
   and leave no process of the server behind; a restart must serve again, and a normal
   stop must leave nothing behind either.

Prints one table; exits 1 when any row fails.

Usage: python tests/reliability/suite.py {vllm,sglang} [--burst N] [--out FILE]
(nox -s reliability runs both engines; CI runs it with a smaller burst.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import sys
import tempfile
import time

import httpx
import torch

import servers
from convgpt_core.tiny import make_checkpoint

VOCAB, H, D = 512, 256, 64  # the tiny preset
MAX_LEN = 512
GOOD = {"model": servers.SERVED_NAME, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}


def _embeds_b64(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode()


def bad_requests(engine: str) -> list[tuple[str, str, object]]:
    """(case, route, body): every one must be refused with a 4xx."""
    comp = "/v1/completions"

    def c(**kw):
        return dict(GOOD, **kw)

    cases = [
        ("token id >= vocab_size", comp, c(prompt=[5, VOCAB, 7])),
        ("token id far out of range", comp, c(prompt=[2**31 - 1])),
        ("negative token id", comp, c(prompt=[5, -1, 7])),
        ("batch with one bad id", comp, c(prompt=[[5, 6], [7, VOCAB + 3]])),
        ("empty text prompt", comp, c(prompt="")),
        ("empty token list", comp, c(prompt=[])),
        ("huge logprobs", comp, c(logprobs=10**6)),
        ("negative max_tokens", comp, c(max_tokens=-5)),
        ("prompt longer than the context", comp, c(prompt=[5] * (MAX_LEN + 10))),
        ("malformed JSON", comp, b'{"model": "convgpt", "prompt": [1, 2'),
        ("chat messages not a list", "/v1/chat/completions",
         {"model": servers.SERVED_NAME, "messages": "hello", "max_tokens": 4}),
    ]
    if engine == "sglang":
        gen = "/generate"
        sp = {"temperature": 0, "max_new_tokens": 4}
        rows = [[0.01] * H for _ in range(3)]
        cases += [
            ("/generate id >= vocab_size", gen, {"input_ids": [5, VOCAB], "sampling_params": sp}),
            ("/generate negative id", gen, {"input_ids": [-3, 5], "sampling_params": sp}),
            ("/generate batch with one bad id", gen, {"input_ids": [[5, 6], [VOCAB + 1]], "sampling_params": sp}),
            ("/generate empty text", gen, {"text": "", "sampling_params": sp}),
            ("/generate huge top_logprobs_num", gen,
             {"input_ids": [5, 6], "sampling_params": sp, "return_logprob": True, "top_logprobs_num": 10**6}),
            ("/generate input_embeds D wide", gen, {"input_embeds": [[0.01] * D] * 3, "sampling_params": sp}),
            ("/generate input_embeds ragged", gen, {"input_embeds": [rows[0], rows[1][:-5]], "sampling_params": sp}),
            ("/generate input_embeds empty", gen, {"input_embeds": [], "sampling_params": sp}),
            ("/generate input_embeds empty row", gen, {"input_embeds": [[]], "sampling_params": sp}),
            ("/generate input_embeds NaN", gen,
             b'{"input_embeds": [[NaN' + b", 0.01" * (H - 1) + b'], [1.0' + b", 0.01" * (H - 1)
             + b'], [1.0' + b", 0.01" * (H - 1) + b']], "sampling_params": {"max_new_tokens": 2}}'),
        ]
    else:
        cases += [
            ("prompt_embeds D wide", comp, c(prompt=None, prompt_embeds=_embeds_b64(torch.full((3, D), 0.01)))),
            ("prompt_embeds NaN", comp,
             c(prompt=None, prompt_embeds=_embeds_b64(torch.tensor([[float("nan")] + [0.01] * (H - 1)] * 3)))),
            ("prompt_embeds inf", comp,
             c(prompt=None, prompt_embeds=_embeds_b64(torch.tensor([[float("inf")] + [0.01] * (H - 1)] * 3)))),
            ("prompt_embeds empty", comp, c(prompt=None, prompt_embeds=_embeds_b64(torch.zeros(0, H)))),
            ("prompt_embeds integer", comp, c(prompt=None, prompt_embeds=_embeds_b64(torch.ones(3, H, dtype=torch.int64)))),
            ("prompt_embeds not base64", comp, c(prompt=None, prompt_embeds="not-base64!!")),
        ]
    return cases


def _message(body) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        body = err.get("message", err) if isinstance(err, dict) else err
    return " ".join(str(body).split())[:90]


def completion_text(server: servers.Server, prompt: list[int]) -> str:
    status, body = server.post("/v1/completions", dict(GOOD, prompt=prompt, max_tokens=8))
    if status != 200:
        raise RuntimeError(f"a good request failed: {status} {_message(body)}")
    return body["choices"][0]["text"]


async def burst(base: str, prompts: list[list[int]], n: int, timeout: float = 900, max_tokens: int = 8,
                **extra) -> list:
    """``n`` concurrent greedy completions cycling through ``prompts`` (``extra``: more request
    fields): text or exception."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def one(i: int):
            body = dict(GOOD, prompt=prompts[i % len(prompts)], max_tokens=max_tokens, **extra)
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=["vllm", "sglang"])
    ap.add_argument("--burst", type=int, default=512, help="concurrent requests in the burst")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    rows: list[tuple[str, str, str, bool]] = []  # (step, case, result, ok)

    def row(step, case, result, ok):
        rows.append((step, case, result, ok))
        print(f"[{'ok' if ok else 'FAIL'}] {step}: {case}: {result}", file=sys.stderr, flush=True)

    work = tempfile.mkdtemp(prefix="convgpt-reliability-")
    model = os.path.join(work, "tiny")
    make_checkpoint(model, preset="tiny", seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, VOCAB, (int(n),), generator=gen).tolist() for n in (1, 3, 8, 17, 30, 64, 100, 150)]
    log = open(os.path.join(work, "server.log"), "w")
    server_args = servers.engine_args(args.engine, MAX_LEN, embeds=True)

    t0 = time.time()
    server = servers.start(args.engine, model, *server_args, log=log)
    row("start", "convgpt serve", f"healthy after {time.time() - t0:.0f} s", True)
    singles = [completion_text(server, p) for p in prompts]

    # 1. bad requests
    for case, route, body in bad_requests(args.engine):
        status, answer = server.post(route, body)
        alive = server.healthy()
        try:
            good = completion_text(server, prompts[1]) == singles[1]
        except Exception:
            good = False
        ok = 400 <= status < 500 and alive and good
        row("bad request", case, f"{status} {_message(answer)}" + ("" if alive and good else "; SERVER DOWN"), ok)
        if not alive:
            server.stop()
            server = servers.start(args.engine, model, *server_args, log=log)

    # 2. a burst of concurrent requests, each equal to its prompt sent alone
    t0 = time.time()
    results = asyncio.run(burst(server.base, prompts, args.burst))
    errors = [r for r in results if isinstance(r, Exception)]
    wrong = sum(1 for i, r in enumerate(results) if not isinstance(r, Exception) and r != singles[i % len(prompts)])
    row("burst", f"{args.burst} concurrent requests",
        f"{len(results) - len(errors)} answered in {time.time() - t0:.0f} s, {len(errors)} errors, "
        f"{wrong} differ from the same prompt sent alone" + (f" (first error: {errors[0]!r})" if errors else ""),
        not errors and not wrong)

    # 3. kill -9 of the server in the middle of a burst
    server.remember_processes()
    victim = server.server_pid()

    async def burst_and_kill():
        # long answers, so that the burst is still running when the server dies (ignore_eos, a
        # field both engines take: a tiny model's answers can end at once; one CPU run got every
        # answer back before the kill)
        task = asyncio.create_task(burst(server.base, prompts, args.burst, timeout=60, max_tokens=300,
                                         ignore_eos=True))
        await asyncio.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        return await task

    results = asyncio.run(burst_and_kill())
    try:
        code = server.proc.wait(60)
    except Exception:
        code = None
    time.sleep(1)
    left = server.survivors()
    cut = sum(isinstance(r, Exception) for r in results)
    row("kill -9", f"server pid {victim} mid-burst ({len(server.descendants)} processes)",
        f"supervisor exited with {code}; {cut} requests cut; "
        f"{len(left)} processes left" + (f": {[p.pid for p in left]}" if left else ""),
        code is not None and cut > 0 and not left)
    for p in left:
        p.kill()

    t0 = time.time()
    server = servers.start(args.engine, model, *server_args, log=log)
    again = completion_text(server, prompts[3])
    row("restart", "convgpt serve again", f"healthy after {time.time() - t0:.0f} s; output "
        f"{'equals' if again == singles[3] else 'DIFFERS FROM'} the first run's", again == singles[3])
    server.remember_processes()
    server.stop()
    time.sleep(1)
    left = server.survivors()
    row("stop", "SIGTERM to convgpt serve", f"exited with {server.proc.returncode}; {len(left)} processes left",
        not left)
    for p in left:
        p.kill()
    log.close()

    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"reliability: {args.engine}, tiny checkpoint, burst {args.burst}", ""]
    header = ("step", "case", "result")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  ok")
    lines.append("  ".join("-" * w for w in widths) + "  --")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  ok" if r[3] else "  FAIL") for r in rows]
    failed = sum(not r[3] for r in rows)
    lines.append(f"\nreliability {args.engine}: {len(rows) - failed} passed, {failed} failed")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
