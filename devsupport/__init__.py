"""Support code that the tests and `bench/` share and users never need: not an installed package
(pyproject.toml's package list leaves it out). Tests reach it through pytest's `pythonpath`
setting; bench scripts add the checkout's root to `sys.path`."""
