"""CF models by name or `module:Class`, and the checkpoint that rebuilds one exactly."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from tca.cf.base import CFConfig, CFModel
from tca.errors import TcaError

MODELS = {
    "sasrec": "tca.cf.sasrec:SASRec",
    "bert4rec": "tca.cf.bert4rec:BERT4Rec",
    "lightgcn": "tca.cf.lightgcn:LightGCN",
    "alpharec": "tca.cf.alpharec:AlphaRec",
    "rlmrec": "tca.cf.rlmrec:RLMRec",
}


def resolve(spec: str) -> type[CFModel]:
    """`sasrec` / `bert4rec` / `package.module:Class` -> the class, checked against the interface."""
    path = MODELS.get(spec, spec)
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise TcaError(f"cf.model: {spec!r} is neither a registered model ({', '.join(MODELS)}) nor module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TcaError(f"cf.model: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from e
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, CFModel)):
        raise TcaError(f"cf.model: {path} is not a subclass of tca.cf.base.CFModel; implement that interface")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TcaError(f"cf.model: {path} does not implement {missing} of tca.cf.base.CFModel")
    return cls


def build(cfg: CFConfig, n_items: int) -> CFModel:
    return resolve(cfg.model)(n_items, cfg)


def save_checkpoint(model: CFModel, path: Path) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"n_items": model.n_items, "config": model.cfg.to_dict(), "state_dict": state}, path)


def load_checkpoint(path: Path, device: str = "cpu", plugin: str | None = None) -> CFModel:
    """The model as saved, in eval mode: its scores equal the saved model's. Nothing the file names
    is imported: it rebuilds a registered model, or a module:Class plugin only when the caller's
    `plugin` (its cf.model) names that same class (weights_only keeps torch from importing either)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = CFConfig.from_params(ckpt["config"])
    if cfg.model not in MODELS and cfg.model != plugin:
        raise TcaError(f"{path} holds a {cfg.model!r} model, which is no registered model ({', '.join(MODELS)}); "
                       f"a checkpoint never imports code it names: to load it, set cf.model={cfg.model} "
                       f"(only if you trust that module: importing it runs its code)")
    model = build(cfg, ckpt["n_items"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
