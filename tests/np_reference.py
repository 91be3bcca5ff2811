"""Independent float64 numpy references of the paper's equations, for tests.

Nothing here imports bitnet_jax: these are the formulas written out again.
"""
import math

import numpy as np

# Paley constructions written out independently of the module: Legendre
# symbols by Euler's criterion, entries filled one by one.


def legendre(a, q):
  a %= q
  if a == 0:
    return 0
  return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def ref_paley1(q):
  """Symmetric Paley I matrix of order q + 1 (q prime, q = 3 mod 4).

  Entry (0, 0) = -1, row 0 = +1, column 0 = +1 (after the documented column
  sign flip), core (i, j) = legendre(-(i + j)) plus 1 on the reversed
  diagonal j = -i, as obtained from I + [[0, 1], [-1, Q]] by reversing core
  columns j -> -j.
  """
  n = q + 1
  h = np.zeros((n, n))
  h[0, 0] = -1
  h[0, 1:] = 1
  h[1:, 0] = 1
  for i in range(q):
    for j in range(q):
      # column j of the result is column -j of I + Q.
      src = (-j) % q
      h[1 + i, 1 + j] = legendre(src - i, q) + (1 if src == i else 0)
  return h


def ref_paley2(q):
  """Symmetric Paley II matrix of order 2(q + 1) (q prime, q = 1 mod 4)."""
  m = q + 1
  conf = np.zeros((m, m))
  conf[0, 1:] = conf[1:, 0] = 1
  for i in range(q):
    for j in range(q):
      conf[1 + i, 1 + j] = legendre(j - i, q)
  h = np.zeros((2 * m, 2 * m))
  for i in range(m):
    for j in range(m):
      if i == j:
        block = [[1, -1], [-1, -1]]
      else:
        block = conf[i, j] * np.array([[1, 1], [1, -1]])
      h[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block
  return h


def ref_sylvester_columns(n, cols):
  """Columns `cols` of the Sylvester matrix: H[i, j] = (-1)^popcount(i & j)."""
  i = np.arange(n)[:, None]
  j = np.asarray(cols)[None, :]
  return 1.0 - 2.0 * (np.bitwise_count(i & j) & 1)


# size -> (K, Paley kind, q); the documented rule: smallest K, Paley I first.
K_SIZES = {
    12: (12, "I", 11), 20: (20, "I", 19), 28: (28, "II", 13),
    36: (36, "II", 17), 44: (44, "I", 43), 60: (60, "I", 59),
    108: (108, "I", 107), 140: (140, "I", 139),
}


def ref_matrix_columns(n, cols):
  if n & (n - 1) == 0:
    return ref_sylvester_columns(n, cols)
  k_order = next(k for k in K_SIZES if n % k == 0 and
                 (n // k) & (n // k - 1) == 0)
  _, kind, q = K_SIZES[k_order]
  hk = ref_paley1(q) if kind == "I" else ref_paley2(q)
  power = n // k_order
  hs = ref_sylvester_columns(power, np.arange(power))
  full_cols = []
  for c in cols:
    full_cols.append(np.kron(hk[:, c // power], hs[:, c % power]))
  return np.stack(full_cols, axis=1)


def ref_fwht(x):
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  out = np.empty(x.shape, np.float64)
  for start in range(0, n, 2048):
    cols = np.arange(start, min(n, start + 2048))
    out[..., cols] = x @ ref_matrix_columns(n, cols)
  return out / np.sqrt(n)


EPS = 1e-5


def np_roundclip(x, a, b):
  return np.minimum(np.maximum(np.round(x), a), b)  # np.round: ties to even


def np_ternary(w):
  w = np.asarray(w, np.float64)
  alpha = np.mean(np.abs(w))
  pre = w / (alpha + EPS)
  return np_roundclip(pre, -1, 1), alpha, pre


def np_int8(x):
  x = np.asarray(x, np.float64)
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  pre = 127.0 / (gamma + EPS) * x
  return np_roundclip(pre, -128, 127), gamma / 127.0, pre


def np_int4(x):
  x = np.asarray(x, np.float64)
  beta = np.mean(np.abs(x), axis=-1, keepdims=True)
  pre = math.sqrt(7) / (beta + EPS) * x
  return np_roundclip(pre, -8, 7), beta / math.sqrt(7), pre


def np_int4_absmax(x):
  """Per-token absmax INT4 of the PTQ baselines (Sec. 3.2)."""
  x = np.asarray(x, np.float64)
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  pre = 7.0 / (gamma + EPS) * x
  return np_roundclip(pre, -8, 7), gamma / 7.0, pre




def np_rmsnorm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(
      scale, np.float64)


def np_hadamard(n):
  """Dense orthonormal Hadamard matrix of a supported size (float64)."""
  return ref_matrix_columns(n, np.arange(n)) / np.sqrt(n)


def np_heads(x, bits):
  """Absmax onto unsigned b-bit levels per token and head (last axis)."""
  x = np.asarray(x, np.float64)
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  top = 2 ** bits - 1
  scale = 2 * gamma / top
  pre = (x + gamma) / (scale + EPS)
  codes = np_roundclip(pre, 0, top)
  return codes, scale, gamma, pre
