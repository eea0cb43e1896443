"""Test plugin: an out-of-tree defense (fine-tuning under another name) with its own search space."""
from pathlib import Path
from typing import ClassVar

from trainables.defenses.ft import FineTuning
from trainables.registry import register_defense


@register_defense
class PluginFineTuning(FineTuning):
    name: ClassVar[str] = "ft_plugin"
    summary: ClassVar[str] = "fine-tuning, registered by a plugin"
    search_space_file: ClassVar[str] = str(Path(__file__).with_name("ft_plugin.yaml"))
