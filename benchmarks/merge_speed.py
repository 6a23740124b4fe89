"""Merge benchmark: ``sanitize`` against mergekit's built-in ``linear`` and the paper-style average.

Three models sharing an init (a base and two perturbed copies) are generated once and cached in
``benchmarks/work/merge_speed/`` (git-ignored). Each method then runs as its own process:

- ``linear``: stock ``mergekit-yaml`` with ``merge_method: linear``, weights 1/1/1, base = model 0;
- ``sanitize-mean`` / ``sanitize-median``: stock ``mergekit-yaml`` with ``merge_method: sanitize``
  (the same three models; this path also runs the pre-merge checks and sha256-hashes every input
  file for the provenance manifest);
- ``reference``: what the paper's code does: load every model's state dict in float32, average
  in memory, save (``python merge_speed.py _reference ...``).

Wall time is measured around the child process; peak RSS is the child's ``ru_maxrss`` from
``os.wait4``. Rounds are interleaved (every method once per round) and the median is reported.
With ``--cuda`` mergekit gets ``--cuda`` and the reference averages on the GPU; the peak GPU memory
in use (``nvidia-smi``, whole device, minus the idle level) is polled as well.

    python benchmarks/merge_speed.py                       # CPU, both models, 3 runs
    python benchmarks/merge_speed.py --size llama --runs 1 --cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work" / "merge_speed"
RESULTS = HERE / "results"
N_MODELS = 3
NOISE = 1e-3  # the donors are the base plus N(0, NOISE^2) on every parameter

# Presets: a causal LM in bf16 (two safetensors shards, as HF stores them) and a classifier in fp32.
SIZES: dict[str, dict[str, Any]] = {
    "llama": {
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "max_shard_size": "200MB",
        "config": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2816,
                   "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 12, "max_position_embeddings": 2048,
                   "tie_word_embeddings": False},
    },
    "bert": {  # bert-base-uncased's shape, 2 labels
        "architecture": "BertForSequenceClassification",
        "dtype": "float32",
        "max_shard_size": "1GB",
        "config": {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "num_labels": 2},
    },
    "tiny": {  # a smoke test of the script itself, not a benchmark
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "max_shard_size": "2MB",
        "config": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                   "max_position_embeddings": 128, "tie_word_embeddings": False},
    },
}
METHODS = ("linear", "sanitize-mean", "sanitize-median", "reference")


# ---------------------------------------------------------------------------------------------
# models


def make_models(size: str) -> tuple[list[Path], dict[str, Any]]:
    """Three models sharing an init, cached; return their folders and a description."""
    spec = SIZES[size]
    folder = WORK / size
    marker = folder / "spec.json"
    wanted = {**spec, "n_models": N_MODELS, "noise": NOISE, "seed": 0}
    paths = [folder / f"model{i}" for i in range(N_MODELS)]
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == wanted:
        return paths, json.loads(marker.read_text())
    import torch
    import transformers

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config_cls = transformers.AutoConfig.for_model(
        {"LlamaForCausalLM": "llama", "BertForSequenceClassification": "bert"}[spec["architecture"]]
    ).__class__
    config = config_cls(**spec["config"])
    torch.manual_seed(0)
    model = getattr(transformers, spec["architecture"])(config).to(getattr(torch, spec["dtype"]))
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for index, path in enumerate(paths):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name])
                if index:
                    noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                    p.add_((noise * NOISE).to(p.dtype))
        model.save_pretrained(path, max_shard_size=spec["max_shard_size"])
    files = sorted(paths[0].glob("*.safetensors"))
    info = {"spec": wanted, "parameters": params,
            "bytes_per_model": sum(f.stat().st_size for f in files),
            "files_per_model": len(files)}
    marker.write_text(json.dumps(info, indent=2))
    del model, base
    return paths, info


# ---------------------------------------------------------------------------------------------
# the paper-style reference, run as a child process


def reference_average(models: list[str], out: str, device: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    state_dicts = []
    dtypes: dict[str, torch.dtype] = {}
    for model in models:
        state: dict[str, torch.Tensor] = {}
        for file in sorted(Path(model).glob("*.safetensors")):
            loaded = load_file(file, device=device)
            if not state_dicts:
                dtypes.update({key: value.dtype for key, value in loaded.items()})
            state.update({key: value.to(torch.float32) for key, value in loaded.items()})
            del loaded
        state_dicts.append(state)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = {}
    for key in state_dicts[0]:
        mean = sum(state[key] for state in state_dicts) / len(state_dicts)
        merged[key] = mean.to(dtypes[key]).cpu().contiguous()
    save_file(merged, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(models[0]) / "config.json", out_dir / "config.json")
    stats: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return stats


# ---------------------------------------------------------------------------------------------
# running and measuring one child


class GpuPoller:
    """Peak device memory in use (nvidia-smi, MiB), polled in a thread while a child runs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used_mib() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, check=True,
        ).stdout
        return int(out.split()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.used_mib())
            except (OSError, ValueError, subprocess.CalledProcessError, IndexError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class AnonPoller:
    """Peak anonymous (non file-backed) RSS of a process, from /proc/<pid>/status.

    ``ru_maxrss`` also counts the pages of memory-mapped inputs (mergekit reads safetensors
    through mmap), which are page cache the kernel can drop; RssAnon is the private memory.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in self.path.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                        break
            except (OSError, ValueError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb * 1024


def run_child(command: list[str], log: Path, env: dict[str, str], cuda: bool) -> dict[str, Any]:
    idle_gpu = None
    if cuda:
        try:
            idle_gpu = GpuPoller.used_mib()
        except (OSError, ValueError, subprocess.CalledProcessError, IndexError):
            pass  # no nvidia-smi: no GPU memory figure
    poller = GpuPoller() if idle_gpu is not None else None
    with open(log, "w") as handle:
        if poller:
            poller.__enter__()
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO)
        anon = AnonPoller(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        peak_anon = anon.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
        if poller:
            poller.__exit__()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    result: dict[str, Any] = {"wall_s": wall, "max_rss_bytes": usage.ru_maxrss * 1024,
                              "max_anon_rss_bytes": peak_anon,
                              "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
    if poller and idle_gpu is not None:
        result["gpu_peak_used_bytes"] = max(0, poller.peak - idle_gpu) * 1024 * 1024
    lines = log.read_text().strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
    return result


def write_recipe(path: Path, method: str, models: list[Path]) -> None:
    import yaml

    entries = [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]
    recipe: dict[str, Any] = {"base_model": str(models[0]), "models": entries}
    if method == "linear":
        recipe["merge_method"] = "linear"
    else:
        recipe["merge_method"] = "sanitize"
        recipe["parameters"] = {"aggregate": method.split("-", 1)[1]}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def mergekit_yaml() -> str:
    beside = Path(sys.executable).parent / "mergekit-yaml"
    found = str(beside) if beside.exists() else shutil.which("mergekit-yaml")
    if not found:
        raise SystemExit("mergekit-yaml not found: install mergekit and mergekit-backdoor")
    return found


def command_for(method: str, recipe: Path, models: list[Path], out: Path, cuda: bool) -> list[str]:
    if method == "reference":
        return [sys.executable, str(Path(__file__).resolve()), "_reference", "--out", str(out),
                "--device", "cuda" if cuda else "cpu", *map(str, models)]
    return [mergekit_yaml(), str(recipe), str(out), "--quiet", "--no-copy-tokenizer",
            *(["--cuda"] if cuda else [])]


def time_hashing(models: list[Path], runs: int) -> dict[str, Any]:
    """sanitize's provenance hashing (sha256 of every input weight file), alone, cache warm."""
    from types import SimpleNamespace

    from mergekit_backdoor.merge.provenance import hash_inputs

    inputs = [SimpleNamespace(name=str(m), weight_files=sorted(m.glob("*.safetensors")))
              for m in models]
    total = sum(f.stat().st_size for m in inputs for f in m.weight_files)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        hash_inputs(inputs, quiet=True)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    return {"wall_s": wall, "runs_s": times, "bytes": total, "gb_per_s": total / wall / 1e9}


# ---------------------------------------------------------------------------------------------
# environment description


def machine_info(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(),
                            "cpu_affinity": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
    except OSError:
        pass
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if cuda:  # from nvidia-smi: no CUDA context in this (parent) process
        try:
            name, memory, driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, check=True).stdout.strip().split(", ")
            info.update(gpu=name, gpu_memory_gb=round(int(memory) * 2**20 / 1e9, 1),
                        gpu_driver=driver)
        except (OSError, ValueError, subprocess.CalledProcessError):
            info["gpu"] = "unknown (nvidia-smi failed)"
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "mergekit", "mergekit-backdoor", "transformers", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mergekit_backdoor"],
                               capture_output=True, text=True, cwd=REPO).stdout.strip()
        if commit:
            found["git"] = commit + ("+dirty" if dirty else "")
    except OSError:
        pass
    return found


# ---------------------------------------------------------------------------------------------
# reporting


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table(results: dict[str, Any], cuda: bool) -> str:
    head = ["model", "method", "wall s", "(min-max)", "CPU s", "peak RSS GB", "time / linear",
            "RSS / linear", "peak anon GB"]
    if cuda:
        head.append("GPU mem GB")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size, block in results["models"].items():
        linear = block["methods"].get("linear")
        label = (f"{size} ({block['model']['parameters'] / 1e6:.1f}M, "
                 f"{block['model']['spec']['dtype']})")
        for method, entry in block["methods"].items():
            cells = [label, method, f"{entry['wall_s']:.2f}",
                     f"{min(entry['runs_wall_s']):.2f}-{max(entry['runs_wall_s']):.2f}",
                     f"{entry['user_s'] + entry['sys_s']:.1f}", gb(entry["max_rss_bytes"])]
            if linear:
                cells += [f"{entry['wall_s'] / linear['wall_s']:.2f}x",
                          f"{entry['max_rss_bytes'] / linear['max_rss_bytes']:.2f}x"]
            else:
                cells += ["", ""]
            cells.append(gb(entry["max_anon_rss_bytes"]))
            if cuda:
                cells.append(gb(entry.get("gpu_peak_used_bytes", 0)))
            rows.append("| " + " | ".join(cells) + " |")
        sha = block["sha256"]
        sanitize = block["methods"].get("sanitize-mean")
        share = f", {sha['wall_s'] / sanitize['wall_s']:.0%} of sanitize-mean" if sanitize else ""
        rows.append(f"| {label} | (sha256 of the 3 inputs) | {sha['wall_s']:.2f} | "
                    f"{gb(sha['bytes'])} GB at {sha['gb_per_s']:.2f} GB/s{share} | | | | | |"
                    + (" |" if cuda else ""))
    return "\n".join(rows)


def median_entry(runs: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"runs": runs,
                             "runs_wall_s": [r["wall_s"] for r in runs],
                             "runs_max_rss_bytes": [r["max_rss_bytes"] for r in runs]}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            entry[key] = statistics.median(values)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true",
                        help="pass --cuda to mergekit-yaml and average the reference on the GPU")
    parser.add_argument("--runs", type=int, default=3, help="runs per method (median reported)")
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all",
                        help="llama (155M, bf16), bert (110M, fp32), all = both, tiny = smoke test")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/merge_speed_<device>.json)")
    args = parser.parse_args(argv)

    device = "cuda" if args.cuda else "cpu"
    out_json = args.out or RESULTS / f"merge_speed_{device}.json"
    sizes = ["llama", "bert"] if args.size == "all" else [args.size]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    results: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device, "runs": args.runs, "machine": machine_info(args.cuda),
        "versions": versions(),
        "notes": ("wall_s / max_rss_bytes are medians over runs of a fresh process each; "
                  "max_rss_bytes is the child's ru_maxrss (counts mmap'd input pages too); "
                  "max_anon_rss_bytes is the peak RssAnon polled every 50 ms; "
                  "mergekit-yaml runs with --quiet "
                  "--no-copy-tokenizer; gpu_peak_used_bytes is nvidia-smi's device-wide "
                  "memory.used peak minus its idle level"),
        "models": {},
    }
    for size in sizes:
        start = time.perf_counter()
        models, info = make_models(size)
        print(f"[{size}] {info['parameters'] / 1e6:.1f}M parameters, {info['spec']['dtype']}, "
              f"{info['files_per_model']} file(s), {gb(info['bytes_per_model'])} GB per model "
              f"(ready in {time.perf_counter() - start:.1f} s)", flush=True)
        scratch = WORK / f"{size}-runs"
        scratch.mkdir(parents=True, exist_ok=True)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
        for round_index in range(args.runs):
            for method in args.methods:
                recipe = scratch / f"{method}.yml"
                if method != "reference":
                    write_recipe(recipe, method, models)
                out = scratch / f"out-{method}"
                shutil.rmtree(out, ignore_errors=True)
                result = run_child(command_for(method, recipe, models, out, args.cuda),
                                   scratch / f"{method}.log", env, args.cuda)
                runs[method].append(result)
                print(f"  round {round_index + 1} {method:16s} {result['wall_s']:7.2f} s  "
                      f"{gb(result['max_rss_bytes'])} GB RSS", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        results["models"][size] = {
            "model": info,
            "methods": {m: median_entry(r) for m, r in runs.items()},
            "sha256": time_hashing(models, max(args.runs, 1)),
        }
        text = table(results, args.cuda)
        results["table_markdown"] = text
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")  # after each model
    print()
    print(text)
    print(f"\nwrote {out_json}")
    return 0


def reference_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="merge_speed.py _reference")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args(argv)
    stats = reference_average(args.models, args.out, args.device)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":
        sys.exit(reference_main(sys.argv[2:]))
    sys.exit(main())
