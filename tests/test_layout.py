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


# The layers, bottom to top: a module imports only from its own layer or
# below (function-local imports too). A top-level module is named by its
# file, a folder by its name; every module has exactly one layer.
LAYERS = (
    ("frame", ("errors", "storage", "progress", "rundir", "logs",
               "config_files", "cli", "defaults", "run_identity",
               "checkpoint")),
    ("math", ("packing", "hadamard", "quant", "ternary_matmul", "sites",
              "partitioning", "chips", "activation_stats", "kernels")),
    ("model", ("model_config", "rotations", "layers", "policy", "kv_cache",
               "model", "loss")),
    ("run config", ("run_config",)),
    ("data", ("data",)),
    ("training", ("training",)),
    ("inference", ("inference", "hf")),
    ("evaluation", ("evaluation", "baselines", "gguf_file")),
    ("commands", ("scale", "experiments", "train", "evaluate", "analyze",
                  "export", "generate", "ptq", "bench")),
)


def unit(module: str) -> str:
  """bitnet_jax.a.b -> "a" (its folder or top-level file)."""
  return module.split(".")[1]


def layer_of():
  index = {}
  for i, (_, units) in enumerate(LAYERS):
    for u in units:
      assert u not in index, f"{u} has two layers"
      index[u] = i
  return index


def imports(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "bitnet_jax."):
      yield node.module
    elif isinstance(node, ast.ImportFrom) and node.module == "bitnet_jax":
      yield from (f"bitnet_jax.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names
                  if a.name.startswith("bitnet_jax."))


def upward_imports(modules):
  index = layer_of()
  bad = []
  for rel, tree in modules:
    name = rel[:-3].replace(os.sep, ".")
    if name.endswith("__init__") and name.count(".") == 1:
      continue  # the package itself
    src = unit(name)
    assert src in index, f"{rel} is in no layer of LAYERS"
    for target in imports(tree):
      dst = unit(target)
      if dst == "configs":  # the shipped config files: data, not code
        continue
      assert dst in index, f"{rel} imports {target}, in no layer"
      if index[dst] > index[src]:
        bad.append(f"{rel} ({LAYERS[index[src]][0]}) imports {target} "
                   f"({LAYERS[index[dst]][0]})")
  return bad


def folder_loops(modules):
  graph = {}
  for rel, tree in modules:
    parts = rel[:-3].split(os.sep)
    if len(parts) < 3:
      continue
    for target in imports(tree):
      dst = target.split(".")
      if os.path.isdir(os.path.join(ROOT, "bitnet_jax", dst[1])) and \
          dst[1] != parts[1]:
        graph.setdefault(parts[1], set()).add(dst[1])
  loops = []

  def visit(node, path):
    for nxt in graph.get(node, ()):
      if nxt in path:
        loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif len(path) < len(graph) + 1:
        visit(nxt, path + [nxt])
  for start in graph:
    visit(start, [start])
  return loops


def test_layers_import_only_downward_and_folders_do_not_loop():
  modules = list(library_modules())
  assert upward_imports(modules) == []
  assert folder_loops(modules) == []


def test_the_layer_rule_catches_a_planted_upward_import():
  planted = [("bitnet_jax/quant.py", ast.parse(
      "from bitnet_jax.training import trainer")),
             ("bitnet_jax/data/x.py", ast.parse(
      "def f():\n  from bitnet_jax.evaluation import perplexity"))]
  assert len(upward_imports(planted)) == 2
  loop = [("bitnet_jax/data/a.py", ast.parse("from bitnet_jax.training import b")),
          ("bitnet_jax/training/b.py", ast.parse("from bitnet_jax.data import a"))]
  assert folder_loops(loop)
