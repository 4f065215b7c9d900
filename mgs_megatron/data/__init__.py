"""Multi-domain prompt data: sources (jsonl / parquet / datasets dirs), schema validation, the prompt sampler
(mixed proportions or sequential schedule, resumable), domain-pure micro-batching, toy data."""
from .microbatch import MicroBatch, plan_microbatches
from .prompt_sampler import DataConfig, PromptSampler, train_val_split
from .schema import DOMAIN_FIELDS, DataValidationError, PromptSample, register_domain_fields, validate_row
from .sources import SourceConfig, load_source, load_sources

__all__ = ["MicroBatch", "plan_microbatches", "DataConfig", "PromptSampler", "train_val_split",
           "DOMAIN_FIELDS",
           "DataValidationError", "PromptSample", "register_domain_fields", "validate_row", "SourceConfig",
           "load_source", "load_sources"]
