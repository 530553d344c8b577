"""Plain cross-entropy training (the 'Student (vanilla baseline)' rows; also how teachers are trained)."""
from kdbench.distill import Method, cross_entropy, register_method


@register_method("vanilla")
class Vanilla(Method):
    needs_teacher = False

    def terms(self, batch, student, teacher):
        return {"ce": cross_entropy(student, batch)}
