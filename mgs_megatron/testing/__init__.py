"""Test utilities: a multi-process gloo harness and tiny locally-built models."""
