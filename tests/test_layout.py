"""The package's layout is its architecture: which subpackage may import
which. Read from the source (every import, also those inside functions),
so a new arrow the wrong way fails here rather than in a code review."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'rcae_jax'

# Each subpackage and what it may import besides itself: the order of the
# layers, bottom up. The top level (main, run, validate) may import all.
MAY_IMPORT = {
    'common': set(),
    'data': {'common'},
    'model': {'common', 'data'},
    'evaluation': {'common', 'data', 'model'},
    'serving': {'common', 'data', 'model', 'evaluation'},
    'training': {'common', 'data', 'model'},
    # Tools may import anything, the top level too (config_files).
    'tools': {'common', 'data', 'model', 'evaluation', 'serving',
              'training', 'top'},
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: pathlib.Path, modules: set) -> set:
  """The package's modules that `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split('.')[0] == 'rcae_jax'):
      for alias in node.names:  # `from pkg import module` or a name in it.
        full = f'{node.module}.{alias.name}'
        found.add(full if full in modules else node.module)
  return found & modules


def import_graph() -> dict:
  files = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def layer(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 2 else 'top'


def test_every_module_is_in_a_layer():
  assert {layer(m) for m in import_graph()} <= set(MAY_IMPORT) | {'top'}


def test_layers_import_only_downwards():
  wrong = sorted(f'{m} -> {d}' for m, deps in import_graph().items()
                 for d in deps if layer(m) != 'top' and layer(d) != layer(m)
                 and layer(d) not in MAY_IMPORT[layer(m)])
  assert not wrong, wrong


def test_inference_side_never_imports_training():
  graph = import_graph()
  inference_side = [m for m in graph if layer(m) in
                    ('common', 'data', 'model', 'evaluation', 'serving')]
  wrong = sorted(f'{m} -> {d}' for m in inference_side for d in graph[m]
                 if layer(d) in ('training', 'tools'))
  assert not wrong, wrong


def test_no_import_cycle():
  graph, state, cycles = import_graph(), {}, []

  def visit(module, path):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        cycles.append(path[path.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, path + [dep])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


def test_standalone_scorer_imports_nothing_of_the_package():
  # It is copied beside an export artefact and run where rcae_jax is absent.
  assert not import_graph()['rcae_jax.serving.serve_export']
