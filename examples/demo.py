"""Serve a ConvGPT checkpoint with vLLM and ask it one completion and one chat question.

Usage: python examples/demo.py CHECKPOINT_DIR   (what `nox -s demo` runs)
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

from convgpt.vllm.launch import serve_command

PORT = 8765


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    sys.exit(f"the server did not answer {url} within {timeout:.0f} s")


def main(model: str) -> None:
    cmd = serve_command(model, "--served-model-name", "convgpt", "--port", str(PORT), "--max-model-len", "1024")
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        wait_ready(proc, f"http://127.0.0.1:{PORT}/health")
        print(f"\nserver ready after {time.time() - t0:.0f} s\n", flush=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
        prompt = "The lighthouse keeper wrote in her logbook"
        comp = client.completions.create(model="convgpt", prompt=prompt, max_tokens=32, temperature=0)
        messages = [{"role": "user", "content": "How many legs does a spider have?"}]
        chat = client.chat.completions.create(model="convgpt", messages=messages, max_tokens=32, temperature=0)
        print("=" * 72)
        print(f"completion  prompt: {prompt!r}")
        print(f"            answer: {comp.choices[0].text!r}")
        print(f"chat        user:   {messages[0]['content']!r}")
        print(f"            reply:  {chat.choices[0].message.content!r}")
        print("=" * 72)
        print("(a tiny random-weight model speaks gibberish; the point is the plumbing)")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main(sys.argv[1])
