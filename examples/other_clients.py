"""Ask a running `vlcache serve` through third-party clients and print what each request reused.

    vlcache serve --detach --port 8000
    pip install openai litellm llm          # the clients; none of them is a vlcache dependency
    python examples/other_clients.py --server http://127.0.0.1:8000 --image examples/rocket.jpg

Each line: the client, the message layout, prompt tokens and `usage.prompt_tokens_details.cached_tokens` (the
tokens the server took from a kept state instead of computing them). Start from a fresh server (or a new
--image) for the "first" rows to be misses. README's "Using other clients" shows a run.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SYSTEM = "You are a helpful AI assistant analyzing an image."
Q1, Q2, Q3 = "What is in this picture?", "What colors dominate the scene?", "Describe the lighting."
MAX_TOKENS = 8


def data_url(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def row(client: str, layout: str, usage) -> None:
    details = getattr(usage, "prompt_tokens_details", None) if not isinstance(usage, dict) else usage.get("prompt_tokens_details")
    cached = (details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", None)) or 0
    prompt = usage["prompt_tokens"] if isinstance(usage, dict) else usage.prompt_tokens
    print(f"{client:<8} | {layout:<62} | prompt {prompt:>5} | cached {cached:>5}", flush=True)


def with_openai(url: str, image: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused")

    def ask(messages):
        reply = client.chat.completions.create(model="any", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        return reply

    system = {"role": "system", "content": SYSTEM}
    first = ask([system, {"role": "user", "content": [image_part(image), {"type": "text", "text": Q1}]}])
    row("openai", "system, user(image, question 1): first", first.usage)
    second = ask([system, {"role": "user", "content": [image_part(image), {"type": "text", "text": Q2}]}])
    row("openai", "system, user(image, question 2)", second.usage)
    follow = ask([system, {"role": "user", "content": [image_part(image), {"type": "text", "text": Q2}]},
                  {"role": "assistant", "content": second.choices[0].message.content},
                  {"role": "user", "content": Q3}])
    row("openai", "... + assistant(answer 2), user(question 3): a follow-up", follow.usage)
    other_system = ask([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [image_part(image), {"type": "text", "text": Q1}]}])
    row("openai", "another system prompt, user(image, question 1)", other_system.usage)
    split = ask([system, {"role": "user", "content": [image_part(image)]}, {"role": "user", "content": Q2}])
    row("openai", "system, user(image), user(question 2): two messages", split.usage)
    for n, question in enumerate((Q1, Q2, Q1), 1):
        after = ask([system, {"role": "user", "content": [{"type": "text", "text": question}, image_part(image)]}])
        label = {1: "question 1", 2: "question 2", 3: "question 1 again"}[n]
        row("openai", f"system, user({label}, image): text before the image", after.usage)


def with_litellm(url: str, image: Path) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of a price list
    import litellm

    common = dict(model="openai/any", api_base=url + "/v1", api_key="unused", max_tokens=MAX_TOKENS, temperature=0)
    messages = [{"role": "user", "content": [image_part(image), {"type": "text", "text": Q3}]}]
    reply = litellm.completion(messages=messages, **common)
    row("litellm", "user(image, question 3), no system prompt: first", reply.usage)
    messages = [{"role": "user", "content": [image_part(image), {"type": "text", "text": Q1}]}]
    reply = litellm.completion(messages=messages, **common)
    row("litellm", "user(image, question 1)", reply.usage)
    usage = None
    for chunk in litellm.completion(messages=[{"role": "user", "content": [image_part(image), {"type": "text", "text": Q2}]}],
                                    stream=True, stream_options={"include_usage": True}, **common):
        usage = getattr(chunk, "usage", None) or usage
    row("litellm", "user(image, question 2), streamed", usage)


def with_llm(url: str, image: Path) -> None:
    """simonw's `llm` CLI, configured for the server as an extra OpenAI-compatible model."""
    if shutil.which("llm") is None:
        print("llm: not installed (pip install llm)")
        return
    home = Path(tempfile.mkdtemp(prefix="llm-home-"))
    (home / "extra-openai-models.yaml").write_text(
        f'- model_id: vlcache\n  model_name: any\n  api_base: "{url}/v1"\n  api_key_name: vlcache\n'
        "  vision: true\n  can_stream: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(home)}
    subprocess.run(["llm", "keys", "set", "vlcache", "--value", "unused"], env=env, check=True)

    def llm(*args: str, label: str) -> None:
        subprocess.run(["llm", *args, "-o", "max_tokens", str(MAX_TOKENS), "-o", "temperature", "0"], env=env, check=True,
                       capture_output=True)
        logged = json.loads(subprocess.run(["llm", "logs", "-n", "1", "--json"], env=env, check=True, capture_output=True,
                                           text=True).stdout)[0]
        row("llm", label, logged["response_json"]["usage"])

    llm("-m", "vlcache", "-a", str(image), Q1, label="llm -a IMAGE 'question 1': first")
    llm("-m", "vlcache", "-a", str(image), Q2, label="llm -a IMAGE 'question 2'")
    llm("-m", "vlcache", "-a", str(image), Q1, label="llm -a IMAGE 'question 1' again")
    llm("-c", Q3, label="llm -c 'question 3': a follow-up")
    shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("VLCACHE_SERVER", "http://127.0.0.1:8000"))
    parser.add_argument("--image", type=Path, default=Path(__file__).with_name("rocket.jpg"))
    args = parser.parse_args()
    url = args.server.rstrip("/").removesuffix("/v1")
    with_openai(url, args.image)
    with_litellm(url, args.image)
    with_llm(url, args.image)


if __name__ == "__main__":
    main()
