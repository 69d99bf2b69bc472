"""Strict Hydra configs: a key that no code reads is an error, not a silent no-op.

Hydra already refuses `max_new_token=5` (not in the config), but `+max_new_token=5` or `+lr=0.5` adds the key and
nothing ever reads it. Every command checks its composed config against the same config composed from the config
files alone (with the user's group choices, e.g. `+experiment=digits`): a key the files do not define is unknown,
unless its node has a `_target_` whose signature takes it (`+trainer.gradient_clip_algorithm=value` is fine,
`+trainer.max_step=5` is not). The error lists the nearest valid keys.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mmgpt.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
TRAIN_SEED_MAX = 2**32 - 1  # Lightning's seed_everything (numpy's legacy seeding) takes no more


def check_config(cfg: DictConfig, config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Raise a UserError naming every key of `cfg` that no code reads, with the nearest valid keys; for train.py,
    also the seed and a resumed checkpoint's model. `overrides`: the command line (default: Hydra's record of it).
    Returns `cfg`."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task)
    groups = [o for o in overrides if _selects_group(o)]
    unknown: list[tuple[str, list[str]]] = []
    if any(o.startswith("+") and o not in groups for o in overrides):  # else Hydra's struct mode already checked
        reference = OmegaConf.to_container(_compose(config_name, groups), resolve=False)
        _walk(OmegaConf.to_container(cfg, resolve=False), reference, "", unknown)
    if unknown:
        valid = sorted(_paths(reference))
        lines = []
        for path, params in unknown:
            near = _nearest(path, valid + params)
            lines.append(f"{path} (did you mean {' or '.join(near)}?)" if near else path)
        raise UserError(f"config key(s) that no code reads: {'; '.join(lines)}. Fix the spelling or drop the "
                        "override: `+key=value` adds a key, it does not make anything read it")
    if config_name == "train":
        _check_train(cfg)
    return cfg


def _check_train(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= TRAIN_SEED_MAX:
        raise UserError(f"seed={seed!r} must be an integer in [0, {TRAIN_SEED_MAX}]")
    if cfg.get("ckpt_path") and not cfg.model.get("init_from"):
        from mmgpt.checkpoint import check_resume
        # dropout may change on resume; every other model field describes the weights being resumed
        fields = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                  if k not in ("init_from", "dropout")}
        check_resume(cfg.ckpt_path, fields)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _selects_group(override: str) -> bool:
    """`+experiment=digits`, `trainer=gpu`, `engine=none`: a choice among config files, kept in the reference."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return (CONF / OverridesParser.create().parse_overrides([override])[0].key_or_group).is_dir()


def _walk(node: dict, reference, prefix: str, unknown: list) -> None:
    params, takes_any = _target_params(node.get("_target_"))
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key in HYDRA_KEYS:
            continue
        if isinstance(reference, dict) and key in reference:
            if isinstance(value, dict) and isinstance(reference[key], dict):
                _walk(value, reference[key], f"{path}.", unknown)
            continue
        if takes_any or key in params or not isinstance(reference, dict):
            continue  # the target takes it (its own code checks the value), or the files leave the node open
        if isinstance(value, dict) and "_target_" in value and _is_collection(reference):
            _walk(value, {}, f"{path}.", unknown)  # a new member (`+callbacks.x._target_=...`): its keys still count
            continue
        unknown.append((path, [f"{prefix}{p}" for p in params]))


def _is_collection(node: dict) -> bool:
    """A node whose every member is an instantiable (conf/callbacks/): the code instantiates each value, so a new
    member with a `_target_` is read."""
    return bool(node) and all(isinstance(v, dict) and "_target_" in v for v in node.values())


def _target_params(target) -> tuple[set[str], bool]:
    """The keyword names a `_target_` accepts, and whether it takes any (**kwargs). No target: none."""
    if not isinstance(target, str):
        return set(), False
    module, _, name = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
        sig = inspect.signature(fn)
    except (ImportError, AttributeError, ValueError, TypeError):
        return set(), True  # instantiate will say what is wrong with the target itself
    named = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _paths(node: dict, prefix: str = ""):
    for key, value in node.items():
        if key in HYDRA_KEYS or key == "hydra":
            continue
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


def _nearest(path: str, valid: list[str]) -> list[str]:
    """Close by the whole dotted path, or by its last part (`lr` -> `optimizer.lr`)."""
    leaf = path.rsplit(".", 1)[-1]
    by_leaf = [v for v in valid if difflib.SequenceMatcher(None, leaf, v.rsplit(".", 1)[-1]).ratio() >= 0.8]
    near = difflib.get_close_matches(path, valid, n=3, cutoff=0.6) + sorted(by_leaf, key=len)
    return [v for v in dict.fromkeys(near) if not path.startswith(v + ".")][:4]  # not the key's own parents
