"""The names a notebook imports from `rept` itself."""

import subprocess
import sys

import rept


def test_every_public_name_resolves_to_its_defining_module():
    for name, module in rept._API.items():
        value = getattr(rept, name)
        assert value.__module__ == module or getattr(value, "__module__", "").startswith(module), name
    assert set(rept.__all__) == {"__version__", *rept._API}
    # a public name that is also a subpackage's would be replaced by the subpackage once it is imported
    import pkgutil

    assert not set(rept._API) & {m.name for m in pkgutil.iter_modules(rept.__path__)}


def test_import_rept_loads_no_torch_and_unknown_names_fail():
    code = ("import sys, rept; assert 'torch' not in sys.modules; "
            "assert 'Tracer' in dir(rept)\n"
            "try:\n    rept.no_such_name\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "no attribute 'no_such_name'" in out.stdout
