"""Tiny builds of text families other than Qwen's, each with its family's special tokens and chat template."""
