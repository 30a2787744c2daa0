"""Data preparation (stage `data`) and the LLM's subsets (stage `subset`); see DESIGN.md "Data"."""
from tca.data.config import DataConfig, SubsetConfig
from tca.data.process import SPLITS, Dataset, build, prepare
from tca.data.sources import FORMS, RawData, Source, parse, read
from tca.data.subset import draw, draw_all

__all__ = ["DataConfig", "SubsetConfig", "SPLITS", "Dataset", "build", "prepare", "FORMS", "RawData", "Source",
           "parse", "read", "draw", "draw_all"]
