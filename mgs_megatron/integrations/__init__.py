"""Adapters that put MGS into other hosts' Megatron loops (each tested against the real host in its own environment):

  verl   verl 0.9.1's Megatron engine (`external_lib: mgs_megatron.integrations.verl`)
"""
