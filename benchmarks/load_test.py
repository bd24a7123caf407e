"""Load test of the HTTP service: K concurrent clients send M inpaint requests to a real uvicorn server on
the loopback interface, in this process, over the tiny random-weight models (no downloads, bounded).

    python benchmarks/load_test.py --requests 48 --clients 4 --steps 4 --size 64

Phase 1 (throughput): each client posts multipart requests with ``wait=true`` one after another; prints
completed/failed counts, requests/s and latency percentiles (client side, request sent to PNG received),
and checks that every answer is the image its seed gives.
Phase 2 (429): with the worker held busy and ``--max-queue`` slots, a burst of ``--burst`` requests: the
first ``max_queue`` are queued (202), the rest answer 429 at once; then every queued job completes.

One worker runs one job at a time (the engine's design), so throughput is that of one device; concurrency
adds queueing latency, not parallel speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(size: int) -> tuple[bytes, bytes]:
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return _png(Image.fromarray(image)), _png(Image.fromarray(mask))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48, help="M: requests in the throughput phase")
    parser.add_argument("--clients", type=int, default=4, help="K: concurrent clients")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--size", type=int, default=64, help="image side, pixels")
    parser.add_argument("--max-queue", type=int, default=4, help="queue slots in the 429 phase")
    parser.add_argument("--burst", type=int, default=12, help="requests sent at once in the 429 phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if not (0 < args.requests <= 1000 and 0 < args.clients <= 64 and 0 < args.burst <= 200):
        parser.error("keep it bounded: requests <= 1000, clients <= 64, burst <= 200")

    import tempfile

    import httpx
    import torch

    from brushnet.methods import get_method_class, inpaint, load_method
    from brushnet.random_models import build_model_set
    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine, Limits
    from brushnet.service.server import BackgroundServer

    torch.set_num_threads(args.threads)
    image_png, mask_png = _scene(args.size)
    print(
        f"# python benchmarks/load_test.py --requests {args.requests} --clients {args.clients} "
        f"--steps {args.steps} --size {args.size} --max-queue {args.max_queue} --burst {args.burst}"
    )
    print(
        f"# {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start, "
        f"torch threads {torch.get_num_threads()}, tiny random models (brushnet), loopback HTTP"
    )

    with tempfile.TemporaryDirectory(prefix="brushnet-load-") as tmp:
        method = load_method("brushnet", build_model_set(tmp, get_method_class("brushnet").models, "tiny"))
        fields = {"steps": args.steps, "prompt": "load test"}

        # reference images, straight from the library, for the seeds used below
        def reference(seed: int) -> np.ndarray:
            img = inpaint(method, Image.open(io.BytesIO(image_png)), Image.open(io.BytesIO(mask_png)),
                          {**fields, "seed": seed}).images[0]  # fmt: skip
            return np.asarray(img)

        # computed before the server starts: the method's pipeline must only ever run on the engine's worker
        t0 = time.perf_counter()
        references = {seed: reference(seed) for seed in range(0, args.requests, 8)}
        direct_s = (time.perf_counter() - t0) / len(references)

        # ---------------------------------------------------------------- phase 1: throughput
        engine = Engine({"brushnet": method}, Limits(max_queue=max(args.requests, 1)))
        with BackgroundServer(create_app(engine)) as server:
            latencies: list[float] = []
            failures: dict[str, int] = {}
            wrong: list[int] = []
            lock = threading.Lock()
            seeds = iter(range(args.requests))

            def client() -> None:
                with httpx.Client(base_url=server.url, timeout=300) as http:
                    while True:
                        with lock:
                            seed = next(seeds, None)
                        if seed is None:
                            return
                        start = time.perf_counter()
                        try:
                            r = http.post(
                                "/api/v1/inpaint",
                                files={"image": ("i.png", image_png), "mask": ("m.png", mask_png)},
                                data={"request": json.dumps({**fields, "seed": seed}), "wait": "true"},
                            )
                        except httpx.HTTPError as exc:
                            key = type(exc).__name__
                        else:
                            key = None if r.status_code == 200 else f"HTTP {r.status_code}"
                        elapsed = time.perf_counter() - start
                        with lock:
                            if key is None:
                                latencies.append(elapsed)
                                got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
                                if seed in references and not np.array_equal(got, references[seed]):
                                    wrong.append(seed)
                            else:
                                failures[key] = failures.get(key, 0) + 1

            t_start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                for future in [pool.submit(client) for _ in range(args.clients)]:
                    future.result()
            wall = time.perf_counter() - t_start
        engine.close()

        done = len(latencies)
        print()
        print(f"phase 1: {args.requests} requests from {args.clients} concurrent clients, wait=true")
        print(f"  completed {done}, failed {sum(failures.values())} {failures or ''}".rstrip())
        print(f"  wall {wall:.2f} s, throughput {done / wall:.2f} requests/s")
        print(
            f"  latency p50 {_percentile(latencies, 50):.3f} s, p95 {_percentile(latencies, 95):.3f} s, "
            f"max {max(latencies, default=float('nan')):.3f} s"
        )
        print(f"  one direct library call (no HTTP, no queue), mean of {len(references)}: {direct_s:.3f} s")
        checked = len(range(0, args.requests, 8))
        print(
            f"  images checked against direct calls with the same seed: {checked - len(wrong)}/{checked} equal"
        )

        # ---------------------------------------------------------------- phase 2: full queue
        gate = threading.Event()
        original_generate = method.generate

        def held_generate(*a, **k):  # holds the worker on the first job until the burst is sent
            gate.wait(60)
            return original_generate(*a, **k)

        method.generate = held_generate
        engine = Engine({"brushnet": method}, Limits(max_queue=args.max_queue))
        codes: list[int] = []
        refused_s: list[float] = []
        with (
            BackgroundServer(create_app(engine)) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):

            def post(seed: int):
                start = time.perf_counter()
                r = http.post(
                    "/api/v1/inpaint",
                    files={"image": ("i.png", image_png), "mask": ("m.png", mask_png)},
                    data={"request": json.dumps({**fields, "seed": seed})},
                )
                return r, time.perf_counter() - start

            first, _ = post(0)  # taken by the worker, held at the gate
            deadline = time.monotonic() + 10
            while http.get("/api/v1/health").json()["running"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(post, range(1, args.burst + 1)))
            accepted = [first.json()["job_id"]]
            for r, elapsed in answers:
                codes.append(r.status_code)
                if r.status_code == 202:
                    accepted.append(r.json()["job_id"])
                elif r.status_code == 429:
                    refused_s.append(elapsed)
            messages = {r.json()["error"] for r, _ in answers if r.status_code == 429}
            gate.set()
            states = []
            for job_id in accepted:
                while (state := http.get(f"/api/v1/jobs/{job_id}").json()["state"]) not in (
                    "done",
                    "failed",
                    "cancelled",
                ):
                    time.sleep(0.02)
                states.append(state)
        engine.close()
        method.generate = original_generate

        print()
        print(
            f"phase 2: worker busy, max_queue {args.max_queue}, burst of {args.burst} from {args.clients} clients"
        )
        print(
            f"  202 queued {codes.count(202)}, 429 refused {codes.count(429)}, other {len(codes) - codes.count(202) - codes.count(429)}"
        )
        if refused_s:
            print(
                f"  429 answered in p50 {_percentile(refused_s, 50) * 1000:.1f} ms, max {max(refused_s) * 1000:.1f} ms"
            )
        for message in sorted(messages):
            print(f"  429 body: {message}")
        print(f"  accepted jobs (incl. the running one) finished: {states.count('done')}/{len(states)} done")


if __name__ == "__main__":
    main()
