"""Stand-in cache builders with build_cpu_cache's signature: fast, slow (to kill), failing."""

import json
import os
import time
from pathlib import Path


def _manifest(model_dir: Path, quant: str, group_size: int) -> dict:
    return {"layout_version": 1, "quant": quant, "group_size": group_size,
            "source_files": sorted(p.name for p in Path(model_dir).glob("*.safetensors"))}


def fast_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    """Writes a temp folder, reports progress, renames it into place (the atomic-write rule)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-fast")
    tmp.mkdir(parents=True)
    manifest = _manifest(model_dir, quant, group_size)
    for step in range(1, 4):
        (tmp / f"layer{step}.bin").write_bytes(bytes(1024 * step))
        if progress:
            progress(step, 3)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    os.rename(tmp, out_dir)
    return manifest


def slow_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    """Writes half a cache (in its temp folder and in out_dir), signals, then hangs."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp-slow")
    tmp.mkdir(parents=True)
    (tmp / "layer1.bin").write_bytes(bytes(4096))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "half-written.bin").write_bytes(bytes(4096))
    if progress:
        progress(1, 10)
    Path(os.environ["KRASIS_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(120)
    raise RuntimeError("slow_builder was not killed")


def failing_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "junk.bin").write_bytes(b"junk")
    raise RuntimeError("the weights do not fit the format")


def crashing_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    """Dies the way a native fault would: no exception, no result."""
    os._exit(3)


def _linger_at_exit() -> None:
    """Keep the child busy for KRASIS_TEST_LINGER_S after its result is sent (a slow exit)."""
    from multiprocessing.util import Finalize

    Finalize(None, time.sleep, args=(float(os.environ["KRASIS_TEST_LINGER_S"]),),
             exitpriority=0)


def lingering_builder(model_dir, out_dir, quant="int4", group_size=128, progress=None) -> dict:
    """fast_builder, whose process then takes a while to exit."""
    _linger_at_exit()
    return fast_builder(model_dir, out_dir, quant, group_size, progress)


def lingering_failing_builder(model_dir, out_dir, quant="int4", group_size=128,
                              progress=None) -> dict:
    """failing_builder, whose process then takes a while to exit."""
    _linger_at_exit()
    return failing_builder(model_dir, out_dir, quant, group_size, progress)
