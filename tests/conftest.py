import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remembered fingerprints go to a folder of this run, never the user's ~/.cache (subprocesses inherit it).
os.environ["VLCACHE_HOME"] = tempfile.mkdtemp(prefix="vlcache-home-")
# Compiled steps, though, are kept from one run to the next (as torch's own temporary cache kept them): a cold
# compile of every served tiny model would cost minutes. This user's alone (0700), as vlcache requires.
# Only inductor's caches: `--compile auto`'s remembered decisions (compile/decisions) stay this run's, so every run
# decides (and tests) afresh.
_COMPILED = Path(tempfile.gettempdir()) / f"vlcache-test-compile-{os.getuid()}"
(_COMPILED / "inductor").mkdir(mode=0o700, parents=True, exist_ok=True)
(Path(os.environ["VLCACHE_HOME"]) / "compile").mkdir(mode=0o700)
(Path(os.environ["VLCACHE_HOME"]) / "compile" / "inductor").symlink_to(_COMPILED / "inductor")

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


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """kind -> a tiny random checkpoint of that family (vlcache.testing.families), built once per test run."""
    from vlcache.testing.families import build_family_checkpoint

    built: dict = {}

    def build(kind):
        if kind not in built:
            built[kind] = build_family_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return build


@pytest.fixture(scope="session")
def family_engine(family_dir):
    """kind -> an Engine on that family's tiny checkpoint (CPU, the checkpoint's dtype), loaded once per test run."""
    from vlcache import Engine

    engines: dict = {}

    def load(kind):
        if kind not in engines:
            engines[kind] = Engine.load(str(family_dir(kind)), device="cpu")
        return engines[kind]

    return load


@pytest.fixture
def live(engine, tmp_path):
    """A real server of the tiny engine's on 127.0.0.1 (random port), for one test (modules that share one across
    their tests define their own module-scoped `live`)."""
    from test_server import LiveServer

    server = LiveServer(engine, tmp_path / "states")
    yield server
    server.close()
@pytest.fixture(scope="session")
def int8_engine(family_dir, tiny_model_dir):
    """kind -> an Engine on that family's tiny checkpoint with --quantize int8 ("qwen3_vl": the suite's tiny model),
    loaded once per test run. Skips where torchao (the quant extra) is not installed."""
    pytest.importorskip("torchao")
    from vlcache import Engine

    engines: dict = {}

    def load(kind):
        if kind not in engines:
            folder = tiny_model_dir if kind == "qwen3_vl" else family_dir(kind)
            engines[kind] = Engine.load(str(folder), device="cpu", quantize="int8")
        return engines[kind]

    return load
