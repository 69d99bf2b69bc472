"""The engine config (conf/engine/*.yaml, what to build) and the engine build record (what was built, kept in
model.json's `engines`), typed here and read nowhere else.

The config's defaults live in conf/engine/auto.yaml only; code that needs a config without Hydra (benchmarks,
tests) starts from `EngineConfig.defaults()`, which reads that file. The build record is the one description of
each engine file: the backend, inspection and the benchmarks read it from the manifest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from mmgpt.contract.typed import build, conf_defaults
from mmgpt.errors import UserError

RUNTIME_OPTIONS = ("auto", "none", "tensorrt", "tensorrt_rtx")
STRATEGIES = ("two_engines", "shared")
# engine name -> graph it is built from; profile names in the order they are added (TensorRT numbers them)
ENGINES = {"two_engines": {"prefill": ("prefill", ("context",)), "decode": ("decode", ("generation",))},
           "shared": {"shared": ("context_generation", ("context", "generation"))}}


@dataclass(frozen=True)
class ProfileRanges:
    """[min, opt, max] of each engine dimension the user chooses; clipped to the exported limits when built."""
    batch: list[int]
    prompt: list[int]  # text tokens in the prompt
    capacity: list[int]  # KV-cache capacity S


@dataclass(frozen=True)
class EngineConfig:
    runtime: str  # auto | none | tensorrt | tensorrt_rtx
    strategy: str  # two_engines | shared
    profiles: ProfileRanges
    workspace_mib: int
    optimization_level: int
    compute_capability: str  # TensorRT-RTX target: auto (this GPU) or SM89, SM86, ...
    timing_cache: str | None  # directory of full TensorRT's timing caches; None: no cache
    tf32: bool
    context_past_slots: int | str  # auto | 0 | 1

    @classmethod
    def from_dict(cls, raw: dict, where: str = "engine") -> "EngineConfig":
        """Checked on the way in: every field present and typed, every choice one of its options."""
        if isinstance(raw, dict) and isinstance(raw.get("compute_capability"), int):
            raw = {**raw, "compute_capability": str(raw["compute_capability"])}
        try:
            cfg = build(cls, raw, where)
        except (KeyError, TypeError) as e:
            raise UserError(f"{e}; see conf/engine/auto.yaml for every engine option") from None
        cfg.validate()
        return cfg

    @classmethod
    def defaults(cls, **changes) -> "EngineConfig":
        """conf/engine/auto.yaml with `changes` applied: for code that runs without Hydra."""
        return cls.from_dict({**conf_defaults("engine/auto.yaml"), **changes})

    def replace(self, **changes) -> "EngineConfig":
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.runtime not in RUNTIME_OPTIONS:
            raise UserError(f"engine.runtime={self.runtime!r}: choose one of {RUNTIME_OPTIONS}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"engine.strategy={self.strategy!r}: choose one of {STRATEGIES}")
        if self.context_past_slots not in ("auto", 0, 1):
            raise UserError(f"engine.context_past_slots={self.context_past_slots!r}: choose auto, 0 or 1")
        for key, mom in asdict(self.profiles).items():
            min_opt_max(mom, f"profiles.{key}")
        if self.workspace_mib < 1 or not 0 <= self.optimization_level <= 5:
            raise UserError(f"engine.workspace_mib={self.workspace_mib} must be >= 1 and engine.optimization_level="
                            f"{self.optimization_level} within 0..5")


def min_opt_max(mom, what: str) -> tuple[int, int, int]:
    if len(mom) != 3 or not 1 <= mom[0] <= mom[1] <= mom[2]:
        raise UserError(f"engine.{what}={list(mom)} must be [min, opt, max] with 1 <= min <= opt <= max")
    return tuple(int(x) for x in mom)


@dataclass(frozen=True)
class EngineFile:
    """One serialized engine in the artifacts directory, as the builder made it."""
    file: str
    bytes: int  # its size when built: an engine file of another size was replaced after the build
    source: str  # the graph it was built from
    io: dict[str, dict]  # tensor name -> {"mode", "dtype", "shape"} as the network declared it
    profiles: dict[str, dict[str, list[list[int]]]]  # profile name, in TensorRT's order -> input -> [min, opt, max]
    builder_weights_bytes: int | None  # from the builder's log, where it says
    build_s: float

    @property
    def profile_names(self) -> list[str]:
        return list(self.profiles)


@dataclass(frozen=True)
class EngineBuild:
    """The engines of one strategy, and what they were built from and with."""
    strategy: str
    runtime: str  # tensorrt | tensorrt_rtx
    version: str
    weights_sha256_tree: str  # the manifest's weights hash at build time
    target: str  # the GPU (or RTX compute capability) it was built for
    context_past_slots: int
    config: EngineConfig
    engines: dict[str, EngineFile]

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.engines.values())

    @property
    def builder_weights_bytes(self) -> int | None:
        known = [e.builder_weights_bytes for e in self.engines.values()]
        return sum(known) if all(known) else None
