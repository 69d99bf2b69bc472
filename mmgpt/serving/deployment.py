"""serve.py's work: Ray Serve replicas of the HTTP app. With no cluster address a local Ray instance starts, so one
command serves on one machine; with one, the replicas spread over the cluster (one GPU each where there are GPUs).
SIGTERM or Ctrl-C shuts Serve down gracefully: replicas stop taking requests, finish the running ones, then exit."""
from __future__ import annotations

import signal
import threading

from omegaconf import DictConfig, OmegaConf

from mmgpt.errors import UserError
from mmgpt.runtime.backends import BACKENDS
from mmgpt.serving.protocol import Limits
from mmgpt.serving.service import ModelService, ServeSettings

APP_NAME = "mmgpt"


class ModelServer:
    """One replica: a ModelService and the app over it (Ray Serve builds the app after the constructor)."""

    def __init__(self, settings: ServeSettings, drain_s: float):
        self.service, self.drain_s = ModelService(settings), drain_s

    def __serve_build_asgi_app__(self):
        from mmgpt.serving.app import build_app
        return build_app(self.service)

    async def drain(self) -> None:
        """Refuse new requests (503) and return once this replica's running and waiting ones have finished."""
        import asyncio
        await asyncio.to_thread(self.service.shutdown, self.drain_s)

    def __del__(self):  # Ray Serve calls it on graceful shutdown; after drain() there is nothing left to wait for
        self.service.shutdown(self.drain_s)


def settings_from(cfg: DictConfig) -> ServeSettings:
    """Every option checked before Ray or a model starts."""
    integers = [(key, cfg[key], 1) for key in ("num_replicas", "rows", "stream_interval", "max_queue",
                                               "default_max_tokens", "replica_num_cpus")]
    integers += [(f"limits.{key}", value, 1) for key, value in cfg.limits.items()] + [("port", cfg.port, 0)]
    for key, value, low in integers:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{key}={value!r} must be an integer >= {low}")
    if cfg.backend not in BACKENDS:
        raise UserError(f"backend={cfg.backend!r}: choose one of {BACKENDS}")
    if cfg.capacity is not None and (not isinstance(cfg.capacity, int) or cfg.capacity < 2):
        raise UserError(f"capacity={cfg.capacity!r} must be an integer >= 2 (or null for the largest bucket)")
    if not isinstance(cfg.prefix_cache_mb, (int, float)) or cfg.prefix_cache_mb < 0:
        raise UserError(f"prefix_cache_mb={cfg.prefix_cache_mb!r} must be a number >= 0 (0 turns the cache off)")
    if cfg.api_key is not None and (not isinstance(cfg.api_key, str) or not cfg.api_key):
        raise UserError("api_key must be a non-empty string (or null for none)")
    return ServeSettings(
        artifacts=ServeSettings.resolve_artifacts(cfg.artifacts, cfg.artifacts_root), backend=cfg.backend,
        engine_strategy=cfg.engine_strategy, device=cfg.device, model_name=cfg.served_model_name, rows=cfg.rows,
        capacity=cfg.capacity, stream_interval=cfg.stream_interval, max_queue=cfg.max_queue,
        prefix_cache_mb=float(cfg.prefix_cache_mb), default_max_tokens=cfg.default_max_tokens, api_key=cfg.api_key,
        limits=Limits(**OmegaConf.to_container(cfg.limits, resolve=True)))


def serve(cfg: DictConfig) -> None:
    """Deploy, print the URL, and block until SIGTERM / SIGINT, then shut down gracefully."""
    settings = settings_from(cfg)
    import ray
    from ray import serve as ray_serve

    if cfg.address:
        ray.init(address=cfg.address)
    else:
        ray.init(include_dashboard=False, num_cpus=cfg.local_num_cpus)
    ray_serve.start(http_options={"host": cfg.host, "port": cfg.port})
    gpus = 1 if settings.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    deployment = ray_serve.deployment(
        ray_serve.ingress()(ModelServer), name=APP_NAME, num_replicas=cfg.num_replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cfg.replica_num_cpus},
        # the engine queues (and answers 429 past max_queue): Serve passes it every request it gets
        max_ongoing_requests=settings.max_queue + settings.rows,
        graceful_shutdown_timeout_s=cfg.drain_s, graceful_shutdown_wait_loop_s=1.0)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray_serve.run(deployment.bind(settings, cfg.drain_s), name=APP_NAME, route_prefix="/")
        print(f"serving {settings.model_name or settings.artifacts} ({settings.artifacts}) at "
              f"http://{cfg.host}:{cfg.port}/v1 with {cfg.num_replicas} replica(s)", flush=True)
        stop.wait()
        print("draining in-flight requests, then stopping", flush=True)
        # Serve's shutdown kills the HTTP proxies at once, cutting open streams: drain the replicas first. Routing
        # picks replicas by load, and a drained one answers at once, so the calls spread over the busy ones.
        handle = ray_serve.get_app_handle(APP_NAME)
        for call in [handle.drain.remote() for _ in range(cfg.num_replicas)]:
            call.result(timeout_s=cfg.drain_s + 30)
        ray_serve.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()

