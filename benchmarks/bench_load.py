"""Peak host memory of `load_pretrained` relative to the checkpoint size.

Writes a random ~1 GB float32 Qwen2-style checkpoint to a temp dir, then loads it in a fresh
process and reads that process's peak RSS. The goal is a ratio below 1.3: the loader streams one
tensor at a time, so the host holds the model about once, not twice.

  python benchmarks/bench_load.py [--layers 16] [--shards 2] [--dtype float32]
  python benchmarks/bench_load.py --source smollm2-135m-instruct   # a GGUF file or named model

With `--source`, a GGUF model is loaded twice in fresh processes: cold (converted into an empty
cache, then loaded) and warm (read from the cache). The size is its dequantized float32 size.

Prints last the ratio of the RSS growth during loading (peak minus the baseline after imports) to
the checkpoint size; the absolute peak, which adds fixed import costs, is printed before it.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_checkpoint(path: pathlib.Path, num_layers: int, num_shards: int) -> int:
    """Random checkpoint in transformers' layout; returns the bytes of tensor data written."""
    import safetensors.numpy
    import transformers

    from toolr1_jax.models import model as model_lib
    from toolr1_jax.models import params

    hf_config = transformers.Qwen2Config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        dtype="float32",
    )
    hf_config.save_pretrained(str(path))
    config = model_lib.ModelConfig.from_hf(hf_config)
    tensors = params.tensor_map(config)
    rng = np.random.default_rng(0)
    groups = np.array_split(np.arange(len(tensors)), num_shards)
    names = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    if num_shards == 1:
        names = [params.SINGLE_FILE]
    weight_map, total = {}, 0
    for fname, group in zip(names, groups, strict=True):
        arrays = {}
        for i in group:
            t = tensors[i]
            arrays[t.hf_name] = 0.02 * rng.standard_normal(t.hf_shape, dtype=np.float32)
            weight_map[t.hf_name] = fname
            total += arrays[t.hf_name].nbytes
        safetensors.numpy.save_file(arrays, str(path / fname), metadata={"format": "pt"})
        del arrays
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / params.INDEX_FILE).write_text(json.dumps(index))
    return total


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def gguf_float32_bytes(source: str) -> int:
    """The dequantized (float32) size of a GGUF file's tensors, from its header alone."""
    import gguf

    from toolr1_jax.models import gguf_file, sources

    path = sources.locate(source) if sources.is_named(source) else gguf_file.find_gguf(source)
    if path is None:
        raise SystemExit(f"--source {source!r} is not a GGUF file or a named model.")
    return sum(4 * int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def load_and_measure(path: str, dtype: str) -> None:
    """Child process: load the checkpoint, print a JSON line with RSS figures."""
    import jax
    import jax.numpy as jnp
    import transformers

    from toolr1_jax.models import params

    # The baseline includes the JAX backend and transformers' config machinery (which imports
    # torch when it is installed): fixed costs that do not grow with the model.
    jax.devices()
    if pathlib.Path(path, "config.json").is_file():
        transformers.AutoConfig.from_pretrained(path)
    else:  # a GGUF source: the same config machinery, from a throwaway config
        from toolr1_jax.models import gguf_file  # noqa: F401

        with tempfile.TemporaryDirectory() as tmp:
            transformers.AutoConfig.for_model("llama").save_pretrained(tmp)
            transformers.AutoConfig.from_pretrained(tmp)
    baseline = _rss_bytes()
    start = time.perf_counter()
    model, _ = params.load_pretrained(path, dtype=jnp.dtype(dtype))
    jax.block_until_ready(jax.tree.leaves(model))
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"baseline": baseline, "peak": peak, "after": _rss_bytes(), "load_s": load_s}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="16 layers is about 1 GB")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="dtype to load into")
    parser.add_argument("--source", help="a GGUF file or named model instead of a random one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load_and_measure(args.child, args.dtype)
        return
    if args.source:
        bench_gguf(args.source, args.dtype)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp)
        size = write_checkpoint(path, args.layers, args.shards)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(path), "--dtype", args.dtype],
            check=True,
            capture_output=True,
            text=True,
        )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    increase = (stats["peak"] - stats["baseline"]) / size
    print(f"checkpoint: {size / gb:.3f} GB float32 in {args.shards} file(s), load as {args.dtype}")
    print(f"baseline RSS after imports: {stats['baseline'] / gb:.3f} GB")
    print(f"peak RSS: {stats['peak'] / gb:.3f} GB, RSS after load: {stats['after'] / gb:.3f} GB")
    print(f"load time: {stats['load_s']:.2f} s ({size / gb / stats['load_s']:.2f} GB/s)")
    print(f"peak RSS (absolute) / checkpoint size: {stats['peak'] / size:.3f}")
    print(f"peak RSS increase during load / checkpoint size: {increase:.3f}")


def _child(source: str, dtype: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", source, "--dtype", dtype],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_gguf(source: str, dtype: str) -> None:
    import os

    size = gguf_float32_bytes(source)
    gb = 1e9
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TOOLR1_JAX_CACHE": cache}
        runs = {"cold (convert + load)": _child(source, dtype, env)}
        runs["warm (cached)"] = _child(source, dtype, env)
    print(f"{source}: {size / gb:.3f} GB dequantized (float32), load as {dtype}")
    for name, stats in runs.items():
        increase = (stats["peak"] - stats["baseline"]) / size
        print(
            f"{name}: {stats['load_s']:.2f} s, peak RSS {stats['peak'] / gb:.3f} GB, "
            f"increase / dequantized size {increase:.3f}"
        )
    worst = max((s["peak"] - s["baseline"]) / size for s in runs.values())
    print(f"peak RSS increase during load / dequantized size (worst of the two): {worst:.3f}")


if __name__ == "__main__":
    main()
