"""Axolotl plugin: `adapter: gatera` in an Axolotl YAML (found through the `axolotl.plugins` entry point)."""

from .args import GateRAArgs
from .plugin import GateRAPlugin

__all__ = ["GateRAArgs", "GateRAPlugin"]
