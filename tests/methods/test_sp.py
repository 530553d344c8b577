"""sp (similarity-preserving KD): match the students' and teachers' row-normalised batch Gram matrices."""
from __future__ import annotations

import numpy as np

from tests.helpers import close, rand64


def test_sp_matches_explicit_loops():
    from kdbench.methods.sp import sp_loss

    f_s, f_t = rand64(5, 3, 2, 2, seed=1), rand64(5, 6, 4, 4, seed=2)
    n = 5

    def gram(f):
        f = f.reshape(n, -1)
        g = np.array([[float(np.dot(f[i], f[j])) for j in range(n)] for i in range(n)])
        return g / np.sqrt((g**2).sum(1, keepdims=True))

    gs, gt = gram(f_s.numpy()), gram(f_t.numpy())
    expected = sum((gt[i, j] - gs[i, j]) ** 2 for i in range(n) for j in range(n)) / n**2
    close(sp_loss(f_s, f_t), expected)
