"""What a large mesh costs to load: YAML parsing with each loader, and the whole of
``load_mesh`` (parse, validate, translate, build the snapshot), median of several runs.

    python benchmarks/generate_mesh.py --pods 5000 --services 1000 --policies 1000 > big.yaml
    python benchmarks/config_load.py big.yaml

The pure-Python loader is the baseline in the same run; then libyaml's; then the core's fast
path with PyYAML behind it, which is what ambient uses (ambient.config.yamlfile). Then a
reload, as ztunnel's config watcher does it (with the MeshCache of the load before), after one
pod's labels changed in the file.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from ambient.config import MeshCache, load_mesh, yamlfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mesh", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    text = args.mesh.read_text()
    loaders = ["PureMeshLoader"] + (["CMeshLoader"] if yamlfile.FAST else []) + ["core"]
    default = yamlfile.MeshLoader
    for name in loaders:
        # "core": the core's fast path (what ambient uses), PyYAML behind it; otherwise that
        # PyYAML loader alone.
        yamlfile.CORE = name == "core"
        yamlfile.MeshLoader = default if name == "core" else getattr(yamlfile, name)
        parse, total, cached = [], [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            documents = sum(1 for _ in yamlfile.load_all(text))
            parse.append(time.perf_counter() - started)
            started = time.perf_counter()
            mesh = load_mesh([args.mesh])
            total.append(time.perf_counter() - started)
            # As ztunnel's first load: with a cache to fill (each document read on its own).
            started = time.perf_counter()
            load_mesh([args.mesh], cache=MeshCache())
            cached.append(time.perf_counter() - started)
        print(
            f"{name}: {documents} documents, YAML {statistics.median(parse):.2f} s, "
            f"load_mesh {statistics.median(total):.2f} s, "
            f"filling a cache {statistics.median(cached):.2f} s "
            f"({len(mesh.workloads)} workloads, {len(mesh.services)} services)"
        )
    reloads = []
    for run in range(args.runs):
        cache = MeshCache()
        load_mesh([args.mesh], cache=cache)
        at = text.index("kind: Pod")
        at = text.index("labels: {", at) + len("labels: {")
        args.mesh.write_text(f"{text[:at]}changed: r{run}, {text[at:]}")
        try:
            started = time.perf_counter()
            load_mesh([args.mesh], cache=cache)
            reloads.append(time.perf_counter() - started)
        finally:
            args.mesh.write_text(text)
    print(
        f"reload after one pod changed: {statistics.median(reloads) * 1000:.0f} ms "
        f"({cache.documents.parsed} document parsed again)"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"peak RSS of this process: {peak} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
