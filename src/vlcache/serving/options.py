"""`vlcache serve`'s settings: what every part of the server reads, so it sits below all of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..media import MediaOptions


@dataclass
class ServeOptions:
    cache_dir: Path | str  # a local folder, or an fsspec URL (s3://bucket/prefix/) several servers share
    memory_budget: int
    disk_quota: int | None = 20 * 2**30  # bytes of computed states' files kept, least recently used removed (None: no bound)
    allow_remote_images: bool = False
    allow_private_urls: bool = False  # remote images from private, loopback and link-local addresses too
    allow_local_files: Path | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch: int = 16
    max_queue: int = 64  # questions waiting beyond the running batch; more get 429
    prefill_chunk: int = 256  # tokens of prefill work between two decode steps
    kv_memory: int | None = None  # bytes of K/V blocks for running rows; more wait in the queue (None: unbounded)
    max_image_pixels: int = 25_000_000  # images and video frames declaring more are refused before decoding
    max_state_bytes: int | None = None  # largest cache file a client may upload (None: the model's K/V at its context)
    max_uploads: int = 2  # uploads received at once; more get 429
    max_downloads: int = 8  # state files sent at once; more get 429
    upload_quota: int | None = None  # bytes of uploaded files kept, least recently used removed (None: 4 x max_state_bytes)
    media_workers: int = 4  # threads that fetch and decode media, apart from the rest of the server
    video_decode_pixels: int = 4_000_000_000  # frame pixels one request may decode (each decoded frame's width x height)
    media: MediaOptions = MediaOptions()  # how videos are sampled (fps, max frames): part of every key
    default_max_tokens: int = 512
    web: bool = True  # the chat page at / (--no-web: off)
    cors_origin: str | None = None  # the one other origin whose pages may call the API (--cors-origin); none by default
    host: str = "127.0.0.1"  # the address listened on: a name requests' Host header may give
    allowed_hosts: tuple[str, ...] = ()  # other names it may give (--allowed-host; "*": any)
    served_model_name: str | None = None  # the model's name in answers (--served-model-name; None: hub id or folder name)
    share_all_states: bool = False  # list and answer by id every state, chat completions' too (--share-all-states)
