"""The code's layout rules (issue: a layout that shows the design), checked
on the source: small modules with a stated concern, no private names
crossing modules, and the variant read only by the quantization policy."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 420  # "no module over ~400 lines"


def library_modules():
  for folder, _, files in os.walk(os.path.join(ROOT, "bitnet_jax")):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, ROOT), ast.parse(open(path).read())


def test_modules_are_small_and_say_their_concern():
  too_long, undocumented = [], []
  for rel, tree in library_modules():
    lines = len(open(os.path.join(ROOT, rel)).read().splitlines())
    if lines > MAX_LINES:
      too_long.append((rel, lines))
    if not ast.get_docstring(tree) and not rel.endswith("__init__.py"):
      undocumented.append(rel)
  assert too_long == [] and undocumented == []


def test_no_private_name_crosses_modules():
  offenders = []
  for rel, tree in library_modules():
    modules = set()  # local names of imported bitnet_jax modules
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
          "bitnet_jax"):
        for a in node.names:
          if a.name.startswith("_"):
            offenders.append(f"{rel}: from {node.module} import {a.name}")
          package = os.path.join(ROOT, *node.module.split("."))
          if os.path.exists(os.path.join(package, a.name + ".py")):
            modules.add(a.asname or a.name)  # a module, not a function
      if isinstance(node, ast.Import):
        modules |= {a.asname for a in node.names
                    if a.name.startswith("bitnet_jax") and a.asname}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in modules and node.attr.startswith("_") and
          not node.attr.startswith("__")):
        offenders.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
  assert offenders == []


def test_only_the_policy_reads_the_variant():
  """The model and the layers ask policy.py what a site does; they never
  branch on cfg.variant themselves."""
  offenders = []
  for rel, tree in library_modules():
    if os.path.basename(rel) not in ("model.py", "layers.py", "kv_cache.py",
                                     "rotations.py"):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr in ("variant",
                                                           "ptq_rotation"):
        offenders.append(f"{rel}:{node.lineno}")
  assert offenders == []
