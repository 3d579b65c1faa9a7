"""Makes `lm_eval --model tinyllama-ref` work from lm-evaluation-harness's own command line.

Installed at the top of site-packages with tinyllama-ref-lm-eval.pth beside it (setup.cfg's data_files), so
Python runs install() at start-up. It imports nothing but the standard library and costs one entry on
sys.meta_path until lm_eval.models is imported.

Why: lm-eval resolves `--model NAME` in its model registry, which holds the names lm_eval/models/__init__.py
lists plus those of modules someone imported. Releases up to 0.4.13 read no plugin entry points, so a
backend in another package is unknown to `lm_eval` itself. tinyllama-ref declares its backend in the
`lm_eval.models` entry-point group (setup.cfg), the group later lm-eval releases read; this module reads
that group as soon as lm_eval.models has run and registers each of tinyllama-ref's names as a lazy
placeholder "module:Class", which the registry imports only when the name is asked for. A harness that
reads the group itself finds the names already there and leaves them be.
"""

import sys

GROUP = "lm_eval.models"
OURS = "tinyllama_ref."             # entry points of other packages are theirs to register


def register():
    """Add tinyllama-ref's lm_eval.models entry points to lm-eval's model registry (lazily)."""
    from importlib.metadata import entry_points
    from lm_eval.api.registry import model_registry
    for ep in entry_points(group=GROUP):
        if ep.value.startswith(OURS) and ep.name not in model_registry:
            # A "module:Class" string, not the EntryPoint: the registry upgrades such a string in place
            # when the module's @register_model runs, where an EntryPoint would count as a clash.
            model_registry.register(ep.name, target=ep.value.replace(" ", ""))


class _AfterLmEvalModels:
    """A finder that finds nothing itself: it lets the usual finders load lm_eval.models, then registers."""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec
        spec = find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as e:          # never break lm-eval over this: say so and go on
                print(f"tinyllama-ref: could not register its lm-eval model: {type(e).__name__}: {e}",
                      file=sys.stderr)
        spec.loader.exec_module = exec_module
        return spec


def install():
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())
