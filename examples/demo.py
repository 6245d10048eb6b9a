"""Serve a ConvGPT checkpoint with `convgpt serve vllm` and ask it one completion and one chat question.

Usage: python examples/demo.py CHECKPOINT_DIR   (what `nox -s demo` runs)
"""

from __future__ import annotations

import sys
import time

from openai import OpenAI

import servers


def main(model: str) -> None:
    print(f"$ convgpt serve vllm {model} --max-model-len 1024", flush=True)
    t0 = time.time()
    server = servers.start("vllm", model, "--max-model-len", "1024")
    try:
        print(f"\nserver ready after {time.time() - t0:.0f} s\n", flush=True)
        client = OpenAI(base_url=f"{server.base}/v1", api_key="none")
        prompt = "The lighthouse keeper wrote in her logbook"
        comp = client.completions.create(model=servers.SERVED_NAME, prompt=prompt, max_tokens=32, temperature=0)
        messages = [{"role": "user", "content": "How many legs does a spider have?"}]
        chat = client.chat.completions.create(model=servers.SERVED_NAME, messages=messages, max_tokens=32,
                                              temperature=0)
        print("=" * 72)
        print(f"completion  prompt: {prompt!r}")
        print(f"            answer: {comp.choices[0].text!r}")
        print(f"chat        user:   {messages[0]['content']!r}")
        print(f"            reply:  {chat.choices[0].message.content!r}")
        print("=" * 72)
        print("(the tiny demo model was fitted to the package's own short text for a minute: it continues the\n"
              " text's lines, so a sensible completion shows the whole stack works; its chat is not trained)")
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
