"""How the cost of preparing training data grows with the data: time, CPU time and peak memory, by size.

    python bench/data_scale.py                      # 1k/10k/60k/100k chats, 100/1,000 pictures (~30 min, 2 cores)
    python bench/data_scale.py --quick              # 200/2,000 chats, 20/100 pictures: checks that everything runs
    python bench/data_scale.py --sizes 10k,100k --pictures "" --ranks 1 --out results.json
    python bench/data_scale.py --quick --keep       # keep the generated data, caches and logs (the path is printed)

Data, generated into a temporary folder with a fixed seed: short ChatML chats (1-3 turns of a few dozen words,
JSONL) for the tiny Qwen2 text model (tuning/tiny.py), and LLaVA-style records of one distinct JPEG each (sizes
around 1024x768) for the tiny Qwen2.5-VL model with the real Qwen2.5-VL processor limits (min_pixels 3136,
max_pixels 12845056, patch 14, merge 2; the toolkit's default --image_max_pixels 768*768 then applies).

Each command runs as a child process, one at a time, each first run on an empty --dataset_cache_dir and its cached
run on the same folder:
  prepare   python -m tuning.data --data_path D --model_name_or_path M --dataset_cache_dir C
  train     finetune.py ... --max_steps 1 (LoRA, 2 samples a step), one rank, and two ranks under torchrun (gloo)

Measured for each: the wall time (for training: until the first optimizer step's loss is logged), the CPU time
(user + system, of the child and every descendant it waited for: os.wait4), the peak resident memory of the
largest process of the tree (VmHWM from /proc/<pid>/status, sampled while it runs: getrusage's ru_maxrss carries a
vfork parent's memory into its child, see tuning/runtime.peak_resident_bytes) and the peak of the tree's summed
proportional set size (Pss: the ranks' shared pages counted once). A Python process's VmHWM is read by an exit hook
(SITECUSTOMIZE below) before the interpreter's teardown, which faults in ~100 MiB of library pages for a moment;
torchrun's ranks leave with os._exit (tuning/runtime.leave_distributed) and a pool's workers are terminated: theirs
is the sampled one.

Derived, and set against the goals: resident bytes per chat on a first run, (peak at 10N - peak at N) / 9N; peak
growth per picture; cached / first run time; two ranks / one rank CPU time spent preparing, where the preparing
CPU of a launch is its first run's CPU minus its cached run's (both load the model and take a step). Read the
growth from 10k chats on: up to a few thousand, the encoding window (conversations and their results in flight,
tuning/data/dataset.py WINDOW) still grows with the data, and where the rest of a set would take over 10 s a pool of
encoding processes starts (the summed Pss jumps by theirs). The --quick sizes check that everything runs; their
ratios are mostly start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the repository, not bench/: bench/profile.py would shadow the standard library's
    sys.path[0] = str(REPO)

SIZES = (1_000, 10_000, 60_000, 100_000)
PICTURES = (100, 1_000)
QUICK_SIZES = (200, 2_000)
QUICK_PICTURES = (20, 100)
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (as tests/test_video.py's REAL_SIZE)
REAL_SIZE = {"shortest_edge": 3136, "longest_edge": 12845056}
PICTURE_SIZES = ((1024, 768), (1000, 750), (1040, 780), (960, 720), (1024, 704), (1072, 804))
KIB, MIB = 1024, 2**20
GOALS = {
    "per_chat_bytes": 2 * KIB,  # resident per chat on a first run
    "cached_ratio": 0.3,  # cached run's time to the first step / the first run's, on 60k chats
    "cached_ratio_chats": 60_000,
    "per_picture_bytes": 1 * MIB,  # peak growth per picture
    "ranks_cpu_ratio": 1.5,  # two ranks' preparing CPU / one rank's
}
CACHE_LINE = re.compile(r"(\d+) samples (?:encoded in ([\d.]+) s, cached at|read from the cache at) (\S+)")
LOSS_LINE = re.compile(r"['\"]loss['\"]\s*:")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """The words of the tiny model's corpus (its tokenizer was trained there, so the token counts are realistic)."""
    from tuning.tiny import _corpus_text

    words = sorted({w.strip(".,!?;:\"'()") for w in _corpus_text().split()} - {""})
    return words


def sentence(rng: random.Random, words: list[str], low: int, high: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return text[0].upper() + text[1:] + rng.choice(".?!")


def write_chats(path: Path, count: int, seed: int) -> Path:
    """`count` ChatML chats, JSONL, streamed (the bench's own memory stays small): 1-3 turns of 12-48 words."""
    rng, words = random.Random(seed), vocabulary()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng, words, 12, 40)})
                messages.append({"role": "assistant", "content": sentence(rng, words, 16, 48)})
            f.write(json.dumps({"type": "chatml", "messages": messages, "source": "bench"}) + "\n")
    return path


COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "grey": (128, 128, 128),
    "brown": (120, 80, 40),
}


def draw_picture(path: Path, index: int, seed: int) -> str:
    """A distinct photo-like JPEG: a smooth random field tinted by a main colour, shapes, sensor-like noise;
    its size one of PICTURE_SIZES. Returns its description (the answer)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index)
    noise = np.random.default_rng(seed * 1_000_003 + index)
    width, height = PICTURE_SIZES[index % len(PICTURE_SIZES)]
    name = rng.choice(sorted(COLOURS))
    field = noise.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    image = Image.blend(image, Image.new("RGB", (width, height), COLOURS[name]), 0.6)
    draw = ImageDraw.Draw(image)
    shapes = rng.randint(2, 6)
    for _ in range(shapes):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(40, width // 3), rng.randint(40, height // 3)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + noise.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=88)
    return f"Mostly {name}, with {shapes} shapes on it."


def write_pictures(folder: Path, count: int, seed: int) -> Path:
    """LLaVA records of `count` pictures (img_0.jpg ...; drawn once, shared by the sizes) in folder/pictures-N.json."""
    records = []
    for k in range(count):
        image = folder / f"img_{k}.jpg"
        answer_file = folder / f"img_{k}.txt"
        if not (image.exists() and answer_file.exists()):
            answer_file.write_text(draw_picture(image, k, seed))
        records.append(
            {
                "id": f"picture-{k}",
                "image": image.name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": answer_file.read_text()},
                ],
            }
        )
    path = folder / f"pictures-{count}.json"
    path.write_text(json.dumps(records))
    return path


def real_limits_vl(folder: Path) -> Path:
    """The tiny Qwen2.5-VL model with the real model's processor limits (as tests/test_video.py makes it)."""
    from tuning.tiny import ensure_tiny

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ensure_tiny("vl"), folder)
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["size"] = dict(REAL_SIZE)
    config_path.write_text(json.dumps(config, indent=2))
    return folder


# -- one command, as a child process ---------------------------------------------------------------------


STATUS_FIELDS = ("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:")
# Put on the children's PYTHONPATH: every Python process of the tree (torchrun's ranks too) writes its VmHWM at exit,
# after its atexit handlers (this one is registered first, so it runs last) and before the interpreter tears down,
# where unloading the libraries faults in some 100 MiB of their file pages for a few milliseconds (RssFile): a
# sampler catches that or not by chance, and it has nothing to do with the data. Processes that end without atexit
# (a pool's workers, terminated) keep their sampled peak.
SITECUSTOMIZE = """
import atexit, json, os, sys

def _data_scale_record(folder=os.environ.get("DATA_SCALE_PEAKS")):
    values = {"argv": sys.argv[:3]}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(STATUS_FIELDS):
                    key, value = line.split()[:2]
                    values[key[:-1]] = int(value) * 1024
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump(values, f)
    except OSError:
        pass

if os.environ.get("DATA_SCALE_PEAKS"):
    atexit.register(_data_scale_record)
""".replace("STATUS_FIELDS", repr(STATUS_FIELDS))


def _status(pid: int) -> dict[str, int]:
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(STATUS_FIELDS):
                key, value = line.split()[:2]
                values[key[:-1]] = int(value) * 1024
    return values


def _pss(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return None


def _name(pid: int) -> str:
    with contextlib.suppress(OSError):
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [p.decode(errors="replace") for p in parts[1:4] if p]
        return " ".join(w if len(w) < 40 else "..." + w[-37:] for w in words) or parts[0].decode()
    return "?"


class TreeSampler(threading.Thread):
    """Every `interval` seconds: the peak resident memory (VmHWM, the kernel's own high-water mark, so nothing is
    missed but the growth of a process's last interval) of the child and each of its descendants, and the tree's
    summed Pss."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.peaks: dict[int, int] = {}
        self.anon_peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.tree_pss_peak = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                pids = [self.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                return
            total = 0
            for pid in pids:
                status = _status(pid)
                if "VmHWM" not in status:  # gone, or a zombie
                    continue
                if pid not in self.names:
                    self.names[pid] = _name(pid)
                self.peaks[pid] = max(self.peaks.get(pid, 0), status["VmHWM"])
                self.anon_peaks[pid] = max(self.anon_peaks.get(pid, 0), status.get("RssAnon", 0))
                pss = _pss(pid)
                total += status["VmRSS"] if pss is None else pss
            self.tree_pss_peak = max(self.tree_pss_peak, total)
            self.done.wait(self.interval)


def child_env(hook: Path, peaks: Path) -> dict:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook), str(REPO), *([path] if path else [])]),
        DATA_SCALE_PEAKS=str(peaks),
        HF_HUB_OFFLINE="1",  # never a hub
        PYTHONUNBUFFERED="1",  # lines arrive when written: the first step's time
    )
    return env


def install_hook(work: Path) -> Path:
    """The folder of the exit hook (SITECUSTOMIZE); refused where a sitecustomize exists already (it would be
    shadowed)."""
    import importlib.util

    if importlib.util.find_spec("sitecustomize") is not None:
        raise SystemExit("a sitecustomize module is installed: the bench's exit hook would shadow it")
    hook = work / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return hook


def run_child(name: str, command: list[str], logs: Path, timeout: float) -> dict:
    """Run `command` from the repository; its measures. Its output goes to logs/<name>.log, each line stamped."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    peaks = logs / f"{name}.peaks"
    peaks.mkdir(exist_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(logs.parent / "hook", peaks),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: a timeout ends the whole tree
    )
    sampler = TreeSampler(process.pid)
    sampler.start()
    lines: list[tuple[float, str, str]] = []
    lock = threading.Lock()

    def read(stream, label):
        for line in stream:
            with lock:
                lines.append((time.perf_counter() - start, label, line.rstrip("\n")))

    readers = [
        threading.Thread(target=read, args=(process.stdout, "out"), daemon=True),
        threading.Thread(target=read, args=(process.stderr, "err"), daemon=True),
    ]
    for reader in readers:
        reader.start()
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
            time.sleep(10)
            os.killpg(process.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)  # the child's rusage, with every descendant it waited for
    except BaseException:  # Ctrl-C: the child has a session of its own, so the terminal's signal missed it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - start
    watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    for reader in readers:
        reader.join(timeout=30)  # an orphaned grandchild may hold a pipe: do not wait for it forever
    with lock:
        lines = list(lines)
    log_path.write_text("".join(f"{t:9.3f} {label} {text}\n" for t, label, text in lines))

    returncode = process.returncode
    first_step = next((t for t, label, text in lines if label == "out" and LOSS_LINE.search(text)), None)
    cache_lines = [m.group(0) for _, _, text in lines if (m := CACHE_LINE.search(text))]
    at_exit = {}
    for file in peaks.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            at_exit[int(file.stem)] = json.loads(file.read_text())
    process_peaks = dict(sampler.peaks)
    for pid, values in at_exit.items():  # the hook's value where there is one: the peak before the teardown
        process_peaks[pid] = values.get("VmHWM", process_peaks.get(pid, 0))
        sampler.names.setdefault(pid, " ".join(values.get("argv", []))[-60:])
    largest = max(process_peaks, key=process_peaks.get, default=None)
    anon_largest = max(sampler.anon_peaks, key=sampler.anon_peaks.get, default=None)
    result = {
        "name": name,
        "command": " ".join(command),
        "returncode": returncode,
        "wall_s": wall,
        "first_step_s": first_step,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_bytes": process_peaks.get(largest, 0),
        "peak_rss_process": sampler.names.get(largest, "?"),
        "peak_rss_at_exit_hook": largest in at_exit,
        "sampled_peak_rss_bytes": max(sampler.peaks.values(), default=0),  # the teardown's file pages, if caught
        "peak_anon_bytes": sampler.anon_peaks.get(anon_largest, 0),  # sampled: RssAnon, the largest process's
        "tree_pss_peak_bytes": sampler.tree_pss_peak,
        "processes": {
            str(pid): {"name": sampler.names.get(pid, "?"), "peak_rss_bytes": peak}
            for pid, peak in sorted(process_peaks.items())
        },
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,  # for comparison only: inherits the bench's own at vfork
        "cache_lines": cache_lines,
        "log": str(log_path),
    }
    if returncode != 0 or timed_out.is_set():
        why = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit status {returncode}"
        tail = [text for _, label, text in lines if label == "err"][-40:] or [text for _, _, text in lines][-40:]
        print(f"\n{name} failed ({why}): {result['command']}\n--- its stderr, last lines:", file=sys.stderr)
        print("\n".join(tail) + "\n---", file=sys.stderr, flush=True)
        result["failed"] = why
        result["stderr_tail"] = tail
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_command(data: Path, model: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tuning.data",
        "--data_path",
        str(data),
        "--model_name_or_path",
        str(model),
        "--dataset_cache_dir",
        str(cache),
    ]


def train_command(data: Path, model: Path, cache: Path, out: Path, ranks: int, batch: int) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    flags = {
        "--model_name_or_path": model,
        "--data_path": data,
        "--dataset_cache_dir": cache,
        "--output_dir": out,
        "--max_steps": 1,
        "--per_device_train_batch_size": batch,
        "--use_lora": True,
        "--save_strategy": "no",
        "--report_to": "none",
        "--logging_steps": 1,  # the first step's loss is logged: its time
        "--disable_tqdm": True,
    }
    return [*launcher, "finetune.py", *(str(part) for pair in flags.items() for part in pair)]


# -- the bench -------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    return sorted({int(float(part.replace("_", "").replace("k", "e3"))) for part in text.split(",") if part.strip()})


def run_pair(kind: str, size: int, what: str, command_of, work: Path, timeout: float, runs: list[dict]) -> None:
    """A first run on an empty cache folder, then a cached run on the same folder."""
    label = f"{kind}-{size}-{what}"
    cache = work / "caches" / label
    first = None
    for run in ("first", "cached"):
        if run == "cached" and first is not None and "failed" in first:
            break  # nothing to read from
        name = f"{label}-{run}"
        log(f"{kind} {size:,}: {what}, {run} run ...")
        result = run_child(name, command_of(cache, work / "outputs" / name), work / "logs", timeout)
        result.update(kind=kind, size=size, what=what, run=run)
        if "failed" not in result:
            log(
                f"  {result['wall_s']:.1f} s"
                + (f" (first step at {result['first_step_s']:.1f} s)" if result["first_step_s"] else "")
                + f", CPU {result['cpu_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / MIB:,.0f} MiB"
            )
        runs.append(result)
        first = first or result


def time_of(result: dict | None) -> float | None:
    """A prepare run's wall time; a training run's time to its first optimizer step."""
    if not result or "failed" in result:
        return None
    if result["what"] == "prepare":
        return result["wall_s"]
    return result["first_step_s"]


def encoded_again(result: dict | None) -> bool:
    """A cached run that missed its cache (the key covers the toolkit's data code: an edit in between misses)."""
    return bool(result) and result["run"] == "cached" and any("encoded in" in s for s in result["cache_lines"])


def find(runs: list[dict], kind: str, size: int, what: str, run: str) -> dict | None:
    return next((r for r in runs if (r["kind"], r["size"], r["what"], r["run"]) == (kind, size, what, run)), None)


def ok(result: dict | None) -> bool:
    return bool(result) and "failed" not in result


def growth_pairs(sizes: list[int]) -> list[tuple[int, int]]:
    """(N, 10N) for every size whose tenfold is measured too; else the smallest and the largest."""
    pairs = [(n, 10 * n) for n in sizes if 10 * n in sizes]
    if not pairs and len(sizes) >= 2:
        pairs = [(sizes[0], sizes[-1])]
    return pairs


def derive(runs: list[dict], chat_sizes: list[int], picture_sizes: list[int], ranks: list[int]) -> dict:
    derived: dict = {"per_chat": [], "per_picture": [], "cached_ratio": [], "ranks_cpu": []}
    whats = ["prepare", *(f"train-{n}rank" for n in ranks)]
    for kind, sizes, key in (("chats", chat_sizes, "per_chat"), ("pictures", picture_sizes, "per_picture")):
        pairs = growth_pairs(sizes) if key == "per_chat" else ([(sizes[0], sizes[-1])] if len(sizes) > 1 else [])
        for low, high in pairs:
            for what in whats:
                for run in ("first", "cached"):
                    a, b = find(runs, kind, low, what, run), find(runs, kind, high, what, run)
                    if ok(a) and ok(b):
                        derived[key].append(
                            {
                                "what": what,
                                "run": run,
                                "from": low,
                                "to": high,
                                "bytes": (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (high - low),
                                "anon_bytes": (b["peak_anon_bytes"] - a["peak_anon_bytes"]) / (high - low),
                                "tree_bytes": (b["tree_pss_peak_bytes"] - a["tree_pss_peak_bytes"]) / (high - low),
                            }
                        )
    for kind, sizes in (("chats", chat_sizes), ("pictures", picture_sizes)):
        for size in sizes:
            for what in whats:
                first, cached = (
                    time_of(find(runs, kind, size, what, "first")),
                    time_of(find(runs, kind, size, what, "cached")),
                )
                if first and cached:
                    derived["cached_ratio"].append(
                        {
                            "kind": kind,
                            "size": size,
                            "what": what,
                            "encoded_again": encoded_again(find(runs, kind, size, what, "cached")),
                            "first": first,
                            "cached": cached,
                            "ratio": cached / first,
                        }
                    )
            if 1 in ranks and 2 in ranks:
                one = [find(runs, kind, size, "train-1rank", r) for r in ("first", "cached")]
                two = [find(runs, kind, size, "train-2rank", r) for r in ("first", "cached")]
                if all(ok(r) for r in (*one, *two)):
                    prep_one = one[0]["cpu_s"] - one[1]["cpu_s"]
                    prep_two = two[0]["cpu_s"] - two[1]["cpu_s"]
                    derived["ranks_cpu"].append(
                        {
                            "kind": kind,
                            "size": size,
                            "one_rank_preparing_cpu_s": prep_one,
                            "two_rank_preparing_cpu_s": prep_two,
                            # a difference at or under zero: preparing costs less than the runs' noise here
                            "ratio": prep_two / prep_one if prep_one > 0 and prep_two > 0 else None,
                            "first_run_cpu_ratio": two[0]["cpu_s"] / one[0]["cpu_s"],
                        }
                    )
    return derived


def goals(derived: dict, chat_sizes: list[int]) -> list[dict]:
    """Each goal of the issue: what was measured, where, and whether it is met (None: not measured)."""
    rows = []
    per_chat = [d for d in derived["per_chat"] if d["run"] == "first"]
    if per_chat:
        worst = max(per_chat, key=lambda d: d["bytes"])
        value = worst["bytes"]
        where = f"{worst['what']}, {worst['from']:,} -> {worst['to']:,} chats (worst of {len(per_chat)})"
    else:
        value, where = None, "not measured"
    rows.append(
        goal_row(
            "at most 2 KiB resident per chat on a first run",
            value,
            GOALS["per_chat_bytes"],
            f"{value / KIB:,.2f} KiB" if value is not None else "-",
            where,
        )
    )

    target = GOALS["cached_ratio_chats"]
    train = [d for d in derived["cached_ratio"] if d["kind"] == "chats" and d["what"] == "train-1rank"]
    at = next((d for d in train if d["size"] == target), None) or (
        max(train, key=lambda d: d["size"]) if train else None
    )
    rows.append(
        goal_row(
            f"a cached run reaches its first step in at most 0.3x the first run's time on {target // 1000}k chats",
            at["ratio"] if at else None,
            GOALS["cached_ratio"],
            f"{at['ratio']:.2f}x ({at['cached']:.1f} s / {at['first']:.1f} s)" if at else "-",
            (
                f"{at['size']:,} chats, one rank"
                + ("" if at["size"] == target else f" ({target:,} not measured)")
                + (" (the cached run encoded again: see the notes)" if at["encoded_again"] else "")
            )
            if at
            else "not measured",
        )
    )

    per_picture = [d for d in derived["per_picture"]]
    if per_picture:
        worst = max(per_picture, key=lambda d: d["bytes"])
        value = worst["bytes"]
        where = (
            f"{worst['what']} ({worst['run']}), {worst['from']:,} -> {worst['to']:,} pictures "
            f"(worst of {len(per_picture)})"
        )
    else:
        value, where = None, "not measured"
    rows.append(
        goal_row(
            "at most 1 MiB more peak memory per picture",
            value,
            GOALS["per_picture_bytes"],
            f"{value / KIB:,.1f} KiB" if value is not None else "-",
            where,
        )
    )

    ranks = [d for d in derived["ranks_cpu"] if d["kind"] == "chats" and d["ratio"] is not None]
    at = max(ranks, key=lambda d: d["size"]) if ranks else None
    rows.append(
        goal_row(
            "two ranks on one machine spend at most 1.5x the CPU time of one rank preparing",
            at["ratio"] if at else None,
            GOALS["ranks_cpu_ratio"],
            f"{at['ratio']:.2f}x ({at['two_rank_preparing_cpu_s']:.1f} s / {at['one_rank_preparing_cpu_s']:.1f} s)"
            if at
            else "-",
            f"{at['size']:,} chats"
            if at
            else "not measured"
            + (" (preparing CPU within the runs' noise at these sizes)" if derived["ranks_cpu"] else ""),
        )
    )
    return rows


def goal_row(goal: str, value, limit, measured: str, where: str) -> dict:
    return {
        "goal": goal,
        "value": value,
        "limit": limit,
        "measured": measured,
        "where": where,
        "met": None if value is None else value <= limit,
    }


def seconds(value) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def mib(value) -> str:
    return "-" if not value else f"{value / MIB:,.0f} MiB"


def tables(runs: list[dict], derived: dict, goal_rows: list[dict], settings: dict) -> str:
    lines = [
        f"Device: {settings['device']}. Chats: tiny Qwen2 ({settings['text_model_name']}); pictures: tiny Qwen2.5-VL "
        "with the real processor limits (min_pixels 3136, max_pixels 12845056), default --image_max_pixels. "
        "Prepare: `python -m tuning.data`; train: `finetune.py --max_steps 1 --use_lora True "
        f"--per_device_train_batch_size {settings['batch']}`, its time until the first step's loss is logged. "
        "First run: an empty --dataset_cache_dir; cached: the same folder again. CPU: user + system of the whole "
        "process tree. Peak RSS: the largest process's VmHWM (at its exit, before the interpreter's teardown); peak "
        "anonymous: its RssAnon, sampled every 0.1 s; all processes: the peak of their summed Pss, sampled.",
        "",
        "| data | size | command | first: time | cached: time | cached / first | first: CPU | cached: CPU "
        "| first: peak RSS | cached: peak RSS | first: all processes |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = []
    for r in runs:
        key = (r["kind"], r["size"], r["what"])
        if key not in seen:
            seen.append(key)
    for kind, size, what in seen:
        first, cached = find(runs, kind, size, what, "first"), find(runs, kind, size, what, "cached")

        def cell(result, measure):
            if result is None:
                return "-"
            if "failed" in result:
                return f"failed ({result['failed']})"
            return measure(result)

        t_first, t_cached = time_of(first), time_of(cached)
        ratio = f"{t_cached / t_first:.2f}x" if t_first and t_cached else "-"
        if encoded_again(cached):
            ratio += " (encoded again)"
        lines.append(
            f"| {kind} | {size:,} | {what} | {cell(first, lambda r: seconds(time_of(r)))} "
            f"| {cell(cached, lambda r: seconds(time_of(r)))} | {ratio} "
            f"| {cell(first, lambda r: seconds(r['cpu_s']))} | {cell(cached, lambda r: seconds(r['cpu_s']))} "
            f"| {cell(first, lambda r: mib(r['peak_rss_bytes']))} | {cell(cached, lambda r: mib(r['peak_rss_bytes']))} "
            f"| {cell(first, lambda r: mib(r['tree_pss_peak_bytes']))} |"
        )
    lines += [
        "",
        "Growth of the peak with the data (per added chat or picture):",
        "",
        "| data | command | run | sizes | peak RSS per item | peak anonymous per item | all processes per item |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for key, kind in (("per_chat", "chats"), ("per_picture", "pictures")):
        for d in derived[key]:
            lines.append(
                f"| {kind} | {d['what']} | {d['run']} | {d['from']:,} -> {d['to']:,} | {d['bytes'] / KIB:,.2f} KiB "
                f"| {d['anon_bytes'] / KIB:,.2f} KiB | {d['tree_bytes'] / KIB:,.2f} KiB |"
            )
    if derived["ranks_cpu"]:
        lines += [
            "",
            "Two ranks against one (preparing CPU: a first run's CPU minus its cached run's):",
            "",
            "| data | size | one rank preparing CPU | two ranks preparing CPU | ratio | first runs' CPU ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for d in derived["ranks_cpu"]:
            ratio = "-" if d["ratio"] is None else f"{d['ratio']:.2f}x"
            lines.append(
                f"| {d['kind']} | {d['size']:,} | {seconds(d['one_rank_preparing_cpu_s'])} "
                f"| {seconds(d['two_rank_preparing_cpu_s'])} | {ratio} | {d['first_run_cpu_ratio']:.2f}x |"
            )
    lines += ["", "Ratios against the goals:", "", "| goal | measured | where | met |", "| --- | ---: | --- | --- |"]
    for g in goal_rows:
        met = "not measured" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['measured']} | {g['where']} | {met} |")
    notes = settings.get("notes") or []
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def check_cache_lines(runs: list[dict]) -> list[str]:
    """What the runs' logs say of the cache, where it is not what the bench set up."""
    notes = []
    for r in runs:
        if "failed" in r:
            continue
        said = r["cache_lines"]
        if not said:
            notes.append(f"{r['name']}: no 'samples encoded in / read from the cache' line in its output")
        elif r["run"] == "first" and any("read from the cache" in s for s in said):
            notes.append(f"{r['name']}: a first run on an empty cache folder said {said[0]!r}")
        elif r["run"] == "cached" and any("encoded in" in s for s in said):
            notes.append(f"{r['name']}: a cached run encoded again: {said[0]!r}")
        if r["what"].startswith("train") and r["first_step_s"] is None:
            notes.append(f"{r['name']}: no loss logged (no first step seen); its time is not counted")
    return notes


def device_name() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()} CPU, {cores} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help=f"chat counts, comma-separated (default {','.join(map(str, SIZES))}); '' none")
    parser.add_argument("--pictures", help=f"picture counts (default {','.join(map(str, PICTURES))}); '' none")
    parser.add_argument("--quick", action="store_true", help="200/2,000 chats and 20/100 pictures: does it all run?")
    parser.add_argument("--ranks", default="1,2", help="training runs with these rank counts ('' for none)")
    parser.add_argument("--picture_ranks", help="the same for the pictures (default: --ranks)")
    parser.add_argument("--batch", type=int, default=2, help="--per_device_train_batch_size of the training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per command (default 4 h; quick 15 min)")
    parser.add_argument("--out", type=Path, help="write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the generated data, caches and logs")
    args = parser.parse_args(argv)

    chat_sizes = parse_sizes(args.sizes) if args.sizes is not None else list(QUICK_SIZES if args.quick else SIZES)
    picture_sizes = (
        parse_sizes(args.pictures) if args.pictures is not None else list(QUICK_PICTURES if args.quick else PICTURES)
    )
    ranks = parse_sizes(args.ranks)
    picture_ranks = ranks if args.picture_ranks is None else parse_sizes(args.picture_ranks)
    timeout = args.timeout or (900 if args.quick else 4 * 3600)
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    log(f"working in {work}")
    install_hook(work)
    runs: list[dict] = []
    try:
        from tuning.tiny import ensure_tiny

        text_model = ensure_tiny("text")
        vl_model = real_limits_vl(work / "models" / "tiny-qwen2.5-vl-real-limits") if picture_sizes else None
        warm = [sys.executable, "-c", "import torch, transformers, peft, tuning.data.dataset"]
        if "failed" in run_child("warm-up", warm, work / "logs", timeout):  # the libraries in the page cache first
            return 1
        if picture_sizes:
            (work / "pictures").mkdir(exist_ok=True)
        kinds = (
            ("chats", chat_sizes, text_model, ranks, lambda n: write_chats(work / f"chats-{n}.jsonl", n, args.seed)),
            (
                "pictures",
                picture_sizes,
                vl_model,
                picture_ranks,
                lambda n: write_pictures(work / "pictures", n, args.seed),
            ),
        )
        for kind, sizes, model, kind_ranks, write in kinds:
            for size in sizes:
                log(f"writing {size:,} {kind}")
                data = write(size)
                run_pair(
                    kind, size, "prepare", lambda c, _o, d=data, m=model: prepare_command(d, m, c), work, timeout, runs
                )
                for n in kind_ranks:
                    command = lambda c, o, d=data, m=model, n=n: train_command(d, m, c, o, n, args.batch)  # noqa: E731
                    run_pair(kind, size, f"train-{n}rank", command, work, timeout, runs)

        derived = derive(runs, chat_sizes, picture_sizes, ranks)
        goal_rows = goals(derived, chat_sizes)
        settings = {
            "device": device_name(),
            "chat_sizes": chat_sizes,
            "picture_sizes": picture_sizes,
            "ranks": ranks,
            "batch": args.batch,
            "seed": args.seed,
            "quick": args.quick,
            "text_model_name": text_model.name,
            "command": "python bench/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "notes": check_cache_lines(runs),
        }
        print(tables(runs, derived, goal_rows, settings), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            report = {"settings": settings, "goals": GOALS, "goal_rows": goal_rows, "derived": derived, "runs": runs}
            args.out.write_text(json.dumps(report, indent=1))
            log(f"wrote {args.out}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r["name"] for r in runs if "failed" in r]
    if failed:
        log(f"{len(failed)} command(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
