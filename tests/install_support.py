"""Shared by the tests that import an installed copy of the package in a subprocess."""

# The development checkout is installed editable: setuptools' finder (last on sys.meta_path)
# serves any `pvm_kernels.*` module the installed copy lacks from the checkout, so a
# compiled extension missing from the copy would be imported from the checkout. The probes
# drop that finder first, to see the installed copy alone.
DROP_EDITABLE_FINDER = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path\n"
    "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n")
