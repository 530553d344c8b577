"""Plain cross-entropy training (the 'Student (vanilla baseline)' rows; also how teachers are trained)."""
from kdbench.distill import Method, register_method


@register_method("vanilla")
class Vanilla(Method):
    paper = "none: cross-entropy on the labels (the student alone)"
    code = "kdbench"
    needs_teacher = False  # its only term, ce, is the base class's
