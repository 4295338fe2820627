import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remembered fingerprints go to a folder of this run, never the user's ~/.cache (subprocesses inherit it).
os.environ["VLCACHE_HOME"] = tempfile.mkdtemp(prefix="vlcache-home-")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from vlcache.testing import build_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO.parent / "shared" / "images"
PHOTOS = ["astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "rocket.jpg", "coffee.png", "camera.png"]
SYSTEM = "You are a helpful AI assistant analyzing an image."


def photo(name: str) -> Path:
    path = IMAGES / name
    if not path.exists():
        pytest.fail(f"sample photograph missing: {path} (tests expect ../shared/images beside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture, other weights: what a fine-tune looks like to vlcache."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-vl-other"), seed=1)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    from vlcache import Engine

    return Engine.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def astronaut_state(engine):
    return engine.cache_image(photo("astronaut.png"), system_prompt=SYSTEM)
