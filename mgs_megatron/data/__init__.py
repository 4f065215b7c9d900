"""Multi-domain prompt data: sources (jsonl / parquet / datasets dirs), schema validation, the domain sampler
(mixed proportions or sequential schedule, resumable), domain-pure micro-batching, toy data."""
from .microbatch import MicroBatch, pack_sequences, plan_microbatches
from .sampler import DataConfig, MultiDomainSampler
from .schema import DOMAIN_FIELDS, DataValidationError, PromptSample, register_domain_fields, validate_row
from .sources import SourceConfig, load_source, load_sources

__all__ = ["MicroBatch", "pack_sequences", "plan_microbatches", "DataConfig", "MultiDomainSampler", "DOMAIN_FIELDS",
           "DataValidationError", "PromptSample", "register_domain_fields", "validate_row", "SourceConfig",
           "load_source", "load_sources"]
