"""Distillation methods, one plugin file each (see kdbench.distill for the interface)."""
