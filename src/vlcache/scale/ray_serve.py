"""`vlcache serve --ray --replicas N`: N copies of the server under Ray Serve, requests routed by what they ask about.

- Each replica is a whole `vlcache serve` (the same FastAPI app, scheduler and store, in-process); all of them
  share one `--cache-dir` (a local folder on one machine, or a bucket URL for a cluster), so a state one replica
  computed is found by the others.
- A router in front reads each request and derives a routing key from the media it names (or the state id a
  thin client names): Ray Serve's model multiplexing sends requests with the same key to the replica that has
  served it, where the state is already hot in memory. Routing only decides where a state is warm; correctness
  never depends on it (any replica answers any request the same way).
"""

import asyncio
import hashlib
import json

# No `from __future__ import annotations` here: Ray ships the router class to its actor by value, and FastAPI
# must see the route's annotations as classes, not as names to look up there.
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

ROUTE_HEADER = "serve_multiplexed_model_id"


def routing_key(body: bytes) -> str:
    """What a request is about: the hash of its image and video URLs in order, or the state id it names; "" for
    text-only requests (any replica)."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get("state"), str):
        return data["state"]
    digest = hashlib.sha256()
    found = False
    for message in data.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "video_url"):
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                digest.update(str(url).encode())
                found = True
    return digest.hexdigest() if found else ""


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one HTTP request through an ASGI app in-process; yields the status and headers, then body chunks
    as the app sends them (streams stay streams)."""
    queue: asyncio.Queue = asyncio.Queue()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects on its own here

    async def send(message):
        await queue.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": query, "headers": headers, "scheme": "http",
             "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 0), "root_path": ""}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            message = await queue.get()
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        if not task.done():
            task.cancel()


def build(model: str, device: str, dtype: str, options, replicas: int, gpus: float, quantize: str = "none",
          threads: int | None = None):
    """The Ray Serve application: a router (the HTTP ingress) and `replicas` server replicas."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0 if not gpus else 1, "num_gpus": gpus},
                      max_ongoing_requests=options.max_batch + options.max_queue)
    class Replica:
        def __init__(self):
            import torch

            from ..engine import Engine
            from ..serving.server import create_app

            if threads is not None:
                torch.set_num_threads(threads)
            self.app = create_app(Engine.load(model, device=device, dtype=dtype, quantize=quantize), options)
            self._lifespan = None

        @serve.multiplexed(max_num_models_per_replica=1024)
        async def warm(self, key: str) -> str:
            return key  # the state itself is found or computed by the app; this only marks where it is warm

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            key = serve.get_multiplexed_model_id()
            if key:
                await self.warm(key)
            async for item in call_asgi(self.app, method, path, query, headers, body):
                yield item

    router_app = FastAPI(docs_url=None, redoc_url=None)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(router_app)
    class Router:
        def __init__(self, replica):
            self.replica = replica

        @router_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def forward(self, request: Request, path: str):
            body = await request.body()
            key = routing_key(body) if request.method == "POST" else ""
            handle = self.replica.options(stream=True, multiplexed_model_id=key)
            stream = handle.handle.remote(request.method, "/" + path, request.url.query.encode(),
                                          [(k.encode(), v.encode()) for k, v in request.headers.items()], body)
            head = await stream.__anext__()
            headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
            if headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(stream, status_code=head["status"], headers=headers)
            chunks = [chunk async for chunk in stream]
            return Response(b"".join(chunks), status_code=head["status"], headers=headers)

    return Router.bind(Replica.bind())


def run(model: str, device: str, dtype: str, options, replicas: int, host: str, port: int, blocking: bool = True,
        verbose: bool = False, quantize: str = "none", threads: int | None = None):
    """Start (or join, with RAY_ADDRESS) a Ray cluster and serve the application on host:port."""

    import ray
    from ray import serve

    from .cluster import init

    init(verbose)
    from ..errors import VlcacheError

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= replicas else 0.0
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(model, device, dtype, options, replicas, gpus, quantize, threads), name="vlcache", route_prefix="/", blocking=blocking)
    except ray.exceptions.RayError as exc:  # a port in use, a replica that cannot load the model, ...
        reason = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1]
        raise VlcacheError(f"Ray Serve could not start vlcache on {host}:{port}: {reason}") from None
