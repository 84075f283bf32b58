"""Tiny builds of vision-language families other than Qwen's, each with its family's processor and template."""
