"""Pluggable CF models: the interface (`CFModel`), SASRec, BERT4Rec, and their trainer."""
from tca.cf.base import CFConfig, CFModel, pad_histories
from tca.cf.registry import MODELS, build, load_checkpoint, resolve, save_checkpoint

__all__ = ["CFConfig", "CFModel", "pad_histories", "MODELS", "build", "load_checkpoint", "resolve", "save_checkpoint"]
