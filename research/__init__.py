"""Probes and diagnostics of the CPU miniature: research code, not part of the `lens` product (see README.md)."""
